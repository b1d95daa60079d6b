"""``python -m demo``: the example app and a Celery worker, end to end, then a clean exit.

Starts ``celery -A worker worker`` and ``uvicorn demo.app:app`` as real processes on the
embedded broker (or env CELERY_BROKER_URL), sends the requests from Litestar's event docs,
and prints which listener ran, in which process, with which arguments.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
EXPECTED_RUNS = 6
TIMEOUT_S = 60.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _post(url: str, payload: dict[str, Any]) -> Any:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"content-type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as error:  # a 4xx the demo asks for (the rolled-back request)
        status, body = error.code, error.read()
    print(f"  POST {url.split('/', 3)[-1]:<20} {json.dumps(payload):<55} -> {status}")
    return json.loads(body or b"null")


def _wait(predicate: Any, what: str, procs: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        if predicate():
            return
        for proc in procs:
            if proc.poll() is not None:
                raise SystemExit(f"demo: a process exited early ({' '.join(map(str, proc.args))}); see its log")
        time.sleep(0.1)
    raise SystemExit(f"demo: timed out waiting for {what}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # celery's warm shutdown stops its own children
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main() -> int:
    data_dir = ROOT / ".celery-events" / "demo"
    shutil.rmtree(data_dir, ignore_errors=True)  # a clean embedded broker and runs file each time
    env = {**os.environ, "CELERY_EVENTS_DATA_DIR": str(data_dir), "LITESTAR_APP": "demo.app:app"}
    runs_file = data_dir / "demo-runs.jsonl"
    port = _free_port()
    broker = os.environ.get("CELERY_BROKER_URL", "the embedded filesystem broker (no server needed)")
    print(f"demo: broker = {broker.split('@')[-1]}")

    data_dir.mkdir(parents=True, exist_ok=True)
    log = open(data_dir / "processes.log", "wb")  # noqa: SIM115 - closed at exit
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker", "worker", "--loglevel", "INFO", "--concurrency", "2"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    web = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "demo.app:app", "--port", str(port), "--log-level", "warning"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    beat = subprocess.Popen(  # emits the periodic "stats_report" event (demo/app.py)
        [sys.executable, "-m", "celery", "-A", "worker", "beat", "--loglevel", "INFO"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    print(f"demo: worker, beat and web app output goes to {log.name}")
    procs = [worker, web, beat]
    try:
        _wait(lambda: _port_open(port), "the web app", procs)
        base = f"http://127.0.0.1:{port}"
        print(f"demo: web app pid {web.pid} on {base}, worker pid {worker.pid}; sending requests")
        _post(f"{base}/users", {"email": "ada@example.com"})
        print("demo: an invitation that fails after emit: its transaction rolls back, its event is dropped")
        _post(f"{base}/users/invite", {"email": "mallory@example.com"})
        _post(f"{base}/users/password", {"email": "ada@example.com"})
        _post(f"{base}/users/delete", {"email": "bob@example.com", "reason": "deleted"})
        print("demo: two reminders due in 2 s; the second is cancelled at once")
        kept = _post(f"{base}/reminders", {"email": "carol@example.com", "delay_s": 2})
        dropped = _post(f"{base}/reminders", {"email": "dave@example.com", "delay_s": 2})
        cancelled = _post(f"{base}/reminders/cancel", {"emission_id": dropped["emission_id"]})
        _wait(lambda: len(_runs(runs_file)) >= EXPECTED_RUNS, "the listeners to run", procs)
        _wait(lambda: _ran(runs_file, "send_trial_reminder"), "the delayed reminder", procs)
        _wait(lambda: _ran(runs_file, "report_stats"), "beat's periodic event", procs)
        time.sleep(max(0.5, dropped["due_at"] + 1.0 - time.time()))  # the cancelled one would have run by now
        print("demo: listeners that ran (in the worker's child processes, not the web app):")
        for run in _runs(runs_file):
            where = "web app!" if run["pid"] == web.pid else "worker"
            print(f"  {run['listener']:<28} pid {run['pid']:<7} ({where})  kwargs={run['kwargs']}")
        reminders = [r["kwargs"]["email"] for r in _runs(runs_file) if r["listener"] == "send_trial_reminder"]
        carol, dave = reminders.count("carol@example.com"), reminders.count("dave@example.com")
        ran_at = next(r["kwargs"]["ran_at"] for r in _runs(runs_file) if r["listener"] == "send_trial_reminder")
        print(f"demo: carol's reminder ran {carol} time(s), {ran_at - kept['due_at']:.2f} s after it was due")
        print(f"demo: dave's reminder: cancel_scheduled -> {cancelled['cancelled']}, ran {dave} time(s)")
        rows = [r["kwargs"] for r in _runs(runs_file) if r["listener"] == "check_user_row"]
        print(f"demo: ada's user_created ran after the commit: the listener found her row: {rows[0]['user_row_found']}")
        mallory = [r for r in _runs(runs_file) if r["kwargs"].get("email") == "mallory@example.com"]
        print(f"demo: mallory's rolled-back request: listener runs {len(mallory)}")
        outbox = _events_status(env)["outbox"]
        print(f"demo: litestar events status: outbox depth {outbox['depth']} (rows committed but not yet published)")
        print("demo: done")
        return 0
    finally:
        for proc in procs:
            _stop(proc)
        log.close()


def _events_status(env: dict[str, str]) -> Any:
    command = [sys.executable, "-m", "litestar", "--app", "demo.app:app", "events", "status", "--json"]
    out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _ran(path: Path, listener: str) -> bool:
    return any(run["listener"] == listener for run in _runs(path))


def _runs(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


if __name__ == "__main__":
    raise SystemExit(main())
