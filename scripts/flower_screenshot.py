"""The README's Flower screenshot: the demo's events in a real Flower, through headless Chromium.

Starts a private redis-server, ``celery -A worker worker -E``, ``celery -A worker flower`` (basic
auth) and ``uvicorn demo.app:app``; sends the demo's requests; waits until Flower has seen each
event's task succeed; then ``node scripts/screenshot/flower.mjs`` (playwright-core driving Debian's
chromium) saves the task list as a PNG. Prints the table text it photographed.

    python scripts/flower_screenshot.py [--out docs/flower-tasks.png]

Needs ``/usr/bin/chromium`` (or env CHROMIUM) and ``npm ci --prefix scripts/screenshot``: ``make
screenshot`` does both (``scripts/screenshot/ensure-browser.sh``).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a file (make screenshot): the repo's helpers are importable

from harness import free_port, port_open, redis_server_binary  # noqa: E402 - after the path is set

NODE_SCRIPT = ROOT / "scripts" / "screenshot" / "flower.mjs"
DEMO_REQUESTS = [
    ("/users", {"email": "ada@example.com"}),
    ("/users/password", {"email": "ada@example.com"}),
    ("/users", {"email": "grace@example.com"}),
    ("/users/delete", {"email": "bob@example.com", "reason": "moved to another provider"}),
]
EXPECTED_EVENT_TASKS = len(DEMO_REQUESTS)
TIMEOUT_S = 60.0
COLUMNS = "name,uuid,state,kwargs,retries,runtime"
"""Fewer columns than ``litestar events flower`` shows, so the picture needs no scrolling."""


def _wait(predicate: Callable[[], Any], what: str, procs: list[subprocess.Popen[bytes]]) -> Any:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        for proc in procs:
            if proc.poll() is not None:
                raise SystemExit(f"screenshot: {' '.join(map(str, proc.args))} exited early")
        time.sleep(0.2)
    raise SystemExit(f"screenshot: timed out waiting for {what}")


def _get(url: str, auth: str | None = None) -> Any:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())
    except (OSError, ValueError):
        return None


def _post(url: str, payload: dict[str, str]) -> None:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"content-type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=10):
        pass


def _start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    out = open(log, "ab")  # noqa: SIM115 - the child keeps it; closed with the process
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def take(out: Path, workdir: Path) -> str:
    """Run the demo under Flower, save the screenshot to ``out``; return the task table's text."""
    redis_port, flower_port, web_port = free_port(), free_port(), free_port()
    auth = f"demo:{secrets.token_urlsafe(12)}"
    env = {
        **os.environ,
        "CELERY_BROKER_URL": f"redis://127.0.0.1:{redis_port}/0",
        "LITESTAR_APP": "demo.app:app",
        "CELERY_EVENTS_DATA_DIR": str(workdir / "data"),
        "FLOWER_BASIC_AUTH": auth,
        "PYTHONUNBUFFERED": "1",
    }
    log = workdir / "processes.log"
    python = sys.executable
    procs: list[subprocess.Popen[bytes]] = []
    with ExitStack() as stack:
        stack.callback(lambda: [_stop(p) for p in reversed(procs)])
        redis_args = ["--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        procs.append(_start([redis_server_binary(), *redis_args, "--dir", str(workdir)], env, log))
        _wait(lambda: port_open(redis_port), "redis-server", procs)
        procs.append(_start([python, "-m", "celery", "-A", "worker", "worker", "--loglevel", "INFO", "-E"], env, log))
        flower_args = [f"--port={flower_port}", "--address=127.0.0.1", f"--tasks_columns={COLUMNS}"]
        procs.append(_start([python, "-m", "celery", "-A", "worker", "flower", *flower_args], env, log))
        web_args = ["demo.app:app", "--port", str(web_port), "--log-level", "warning"]
        procs.append(_start([python, "-m", "uvicorn", *web_args], env, log))

        flower = f"http://127.0.0.1:{flower_port}"
        _wait(lambda: (_get(f"{flower}/workers?json=1", auth) or {}).get("data"), "Flower to see the worker", procs)
        _wait(lambda: port_open(web_port), "the demo web app", procs)
        for path, payload in DEMO_REQUESTS:
            _post(f"http://127.0.0.1:{web_port}{path}", payload)

        def settled() -> bool:
            tasks = _get(f"{flower}/api/tasks", auth) or {}
            done = [t for t in tasks.values() if t.get("state") in ("SUCCESS", "FAILURE")]
            return len(done) >= EXPECTED_EVENT_TASKS and len(done) == len(tasks)

        _wait(settled, "Flower to show every event task settled", procs)
        out.parent.mkdir(parents=True, exist_ok=True)
        node = subprocess.run(
            ["node", str(NODE_SCRIPT), flower, auth, str(out)],
            cwd=NODE_SCRIPT.parent,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if node.returncode != 0:
            raise SystemExit(f"screenshot: chromium failed:\n{node.stdout}\n{node.stderr}")
        return node.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "flower-tasks.png")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="flower-screenshot-") as workdir:
        table = take(options.out.resolve(), Path(workdir))
    print(table)
    print(f"screenshot: saved {options.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
