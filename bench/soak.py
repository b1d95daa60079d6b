"""Soak: emit many events while listeners fail at random, workers restart and the broker pauses.

    python -m bench.soak                    # 50,000 events, 10% of listener calls failing
    python -m bench.soak --events 5000      # a quicker run

Not part of CI. It starts a private ``redis-server`` (never touches a shared one), a real
``celery -A worker worker`` running this module's app, and emits from a Litestar app in this
process (spool on). During the stream it restarts the worker twice (once gracefully, once with
SIGKILL of the whole worker) and pauses the broker once (``CLIENT PAUSE``). Then it prints a
ledger: every emission must have succeeded or be in the failed-events store; ``lost`` must be 0.
Duplicates are reported, not hidden: delivery is at-least-once.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import redis
from celery import current_task
from litestar import Litestar

from harness import free_port, redis_server_binary
from litestar_celery_events import CeleryEventsConfig, CeleryEventsPlugin, RetryPolicy, listener

ROOT = Path(__file__).resolve().parent.parent
LEDGER_ENV = "SOAK_LEDGER_URL"
FAIL_RATE_ENV = "SOAK_FAIL_RATE"
SUCCEEDED_KEY = "soak:succeeded"
TRACE_KEY = "soak:trace"
CALLS_KEY = "soak:calls"
INJECTED_KEY = "soak:injected_failures"
VISIBILITY_TIMEOUT_S = 15

_ledger: tuple[int, redis.Redis] | None = None


def _ledger_client() -> redis.Redis:
    global _ledger
    if _ledger is None or _ledger[0] != os.getpid():
        _ledger = (os.getpid(), redis.Redis.from_url(os.environ[LEDGER_ENV]))
    return _ledger[1]


class InjectedFailure(RuntimeError):
    """The soak's own random listener failure."""


@listener("soak", max_retries=2, default_retry_delay=0.05, retry_backoff=False)
def soak_listener(n: int) -> None:
    client = _ledger_client()
    client.incr(CALLS_KEY)
    failing = random.random() < float(os.environ.get(FAIL_RATE_ENV, "0.1"))
    # Every call, for the post-mortem of a lost or duplicated event: which task, attempt, process, when.
    request = current_task.request
    outcome = "fail" if failing else "ok"
    client.rpush(TRACE_KEY, f"{n}|{request.id}|{request.retries}|{outcome}|{os.getpid()}|{time.time():.3f}")
    if failing:
        client.incr(INJECTED_KEY)
        raise InjectedFailure(f"injected failure for event {n}")
    client.hincrby(SUCCEEDED_KEY, str(n), 1)


def create_app() -> Litestar:
    return Litestar(
        listeners=[soak_listener],
        plugins=[
            CeleryEventsPlugin(
                CeleryEventsConfig(
                    default_retry=RetryPolicy(max_retries=2, default_retry_delay=0.05, retry_backoff=False),
                    spool=True,
                    flush_timeout_s=30,
                    celery_config={
                        "broker_transport_options": {
                            # A worker killed with -9 leaves its prefetched messages unacked: they
                            # come back after this long (the library's own default is Celery's hour).
                            "visibility_timeout": VISIBILITY_TIMEOUT_S,
                            "unacked_restore_interval": 2,
                            "unacked_restore_throttle": 1,
                        }
                    },
                )
            )
        ],
    )


# --- the driver -------------------------------------------------------------------------------


def _log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", flush=True)


class Worker:
    def __init__(self, env: dict[str, str], log: Path, concurrency: int) -> None:
        self.env, self.log, self.concurrency = env, log, concurrency
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        out = open(self.log, "ab")  # noqa: SIM115 - owned by the child process
        args = ["worker", "--loglevel", "WARNING", "--concurrency", str(self.concurrency)]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker", *args, "--without-gossip", "--without-mingle"],
            cwd=ROOT,
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        out.close()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def _ledger_of(
    client: redis.Redis, broker: redis.Redis, store_records: list[dict[str, Any]], emitted: int
) -> dict[str, Any]:
    runs = {int(k): int(v) for k, v in client.hgetall(SUCCEEDED_KEY).items()}
    failed = Counter(int(r["kwargs"]["n"]) for r in store_records if r.get("event_id") == "soak")
    accounted = set(runs) | set(failed)
    return {
        "emitted": emitted,
        "succeeded": len(runs),
        "in_failed_store": len(failed),
        "lost": len(set(range(emitted)) - accounted),
        "lost_events": sorted(set(range(emitted)) - accounted)[:30],
        "duplicated": sum(v - 1 for v in runs.values() if v > 1),
        "duplicated_events": sorted(n for n, v in runs.items() if v > 1)[:30],
        "both_succeeded_and_failed": len(set(runs) & set(failed)),
        "both_events": sorted(set(runs) & set(failed))[:30],
        "listener_calls": int(client.get(CALLS_KEY) or 0),
        "injected_failures": int(client.get(INJECTED_KEY) or 0),
        "unacked_in_broker": int(broker.hlen("unacked")),
    }


def _post_mortem(client: redis.Redis, ledger: dict[str, Any], emission_ids: list[str], faults: list[str]) -> None:
    """For each lost or duplicated event: its emission id and every listener call it got."""
    wanted = set(ledger["lost_events"]) | set(ledger["duplicated_events"]) | set(ledger["both_events"])
    if not wanted:
        return
    calls: dict[int, list[str]] = {n: [] for n in wanted}
    for raw in client.lrange(TRACE_KEY, 0, -1):
        n, task_id, retries, outcome, pid, at = raw.decode().split("|")
        if int(n) in calls:
            clock = time.strftime("%H:%M:%S", time.localtime(float(at))) + at[at.index(".") :]
            calls[int(n)].append(f"{clock} pid {pid} task {task_id} retries={retries} {outcome}")
    _log("faults: " + "; ".join(faults))
    for kind, label in (("lost", "lost"), ("duplicated", "duplicated"), ("both", "succeeded and in the failed store")):
        for n in ledger[f"{kind}_events"]:
            _log(f"{label}: event n={n} emission {emission_ids[n]}, {len(calls[n])} listener call(s)")
            for line in calls[n]:
                _log(f"    {line}")


def main() -> None:  # noqa: PLR0915 - a script that reads top to bottom
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--fail-rate", type=float, default=0.1)
    parser.add_argument("--emit-seconds", type=float, default=40.0, help="spread the emits over this long")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--settle-timeout", type=float, default=300.0)
    options = parser.parse_args()

    from litestar.testing import TestClient

    from litestar_celery_events.stores.state import failed_store_for

    workdir = Path(tempfile.mkdtemp(prefix="soak-"))
    port = free_port()
    redis_proc = subprocess.Popen(
        [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    broker = f"redis://127.0.0.1:{port}/0"
    env = {
        **os.environ,
        "CELERY_BROKER_URL": broker,
        LEDGER_ENV: f"redis://127.0.0.1:{port}/1",
        FAIL_RATE_ENV: str(options.fail_rate),
        "LITESTAR_APP": "bench.soak:create_app",
        "CELERY_EVENTS_DATA_DIR": str(workdir / "data"),
        "PYTHONUNBUFFERED": "1",
    }
    os.environ.update({k: env[k] for k in ("CELERY_BROKER_URL", LEDGER_ENV, "CELERY_EVENTS_DATA_DIR")})
    admin = redis.Redis.from_url(broker)
    ledger = redis.Redis.from_url(env[LEDGER_ENV])
    for _ in range(200):
        try:
            admin.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    worker = Worker(env, workdir / "worker.log", options.concurrency)
    started = time.monotonic()
    _log(f"{options.events} events, {options.fail_rate:.0%} listener failures, broker {broker}, logs in {workdir}")
    worker.start()
    time.sleep(3)

    app = create_app()
    n_total = options.events
    # Faults at fixed points of the stream: restart, kill -9 + restart, pause the broker.
    faults = {
        n_total * 2 // 10: "restart",
        n_total * 5 // 10: "pause",
        n_total * 7 // 10: "kill",
    }
    fault_threads: list[threading.Thread] = []
    fault_log: list[str] = []

    def fault(kind: str) -> None:
        fault_log.append(f"{kind} at {time.strftime('%H:%M:%S')}.{int(time.time() % 1 * 1000):03d}")
        if kind == "restart":
            _log("fault: graceful worker restart (SIGTERM, start)")
            worker.stop(signal.SIGTERM)
            worker.start()
        elif kind == "kill":
            _log("fault: SIGKILL of the whole worker, start a new one")
            worker.stop(signal.SIGKILL)
            worker.start()
        else:
            _log("fault: CLIENT PAUSE 3000 ALL on the broker")
            admin.execute_command("CLIENT", "PAUSE", 3000, "ALL")

    with TestClient(app):
        pace = options.emit_seconds / max(1, n_total)
        emit_started = time.monotonic()
        enqueue = app.event_emitter.enqueue  # type: ignore[attr-defined]
        emission_ids: list[str] = []
        for n in range(n_total):
            if n in faults:
                thread = threading.Thread(target=fault, args=(faults[n],))
                thread.start()
                fault_threads.append(thread)
            emission_ids.append(enqueue("soak", n=n))
            lag = emit_started + n * pace - time.monotonic()
            if lag > 0.002:
                time.sleep(lag)
        _log(f"emitted {n_total} in {time.monotonic() - emit_started:.1f}s; flushing")
        for thread in fault_threads:
            thread.join()
    _log("web side flushed; waiting for the ledger to settle")

    store = failed_store_for(app.event_emitter.config, app.event_emitter.celery_app)  # type: ignore[attr-defined]
    deadline = time.monotonic() + options.settle_timeout
    last: dict[str, Any] = {}
    stable_since = time.monotonic()
    while time.monotonic() < deadline:
        current = _ledger_of(ledger, admin, store.records(event_id="soak"), n_total)
        if current != last:
            last, stable_since = current, time.monotonic()
        elif current["lost"] == 0 and time.monotonic() - stable_since > 5:
            break
        elif time.monotonic() - stable_since > 4 * VISIBILITY_TIMEOUT_S:
            break  # nothing moves any more: what is missing is lost
        time.sleep(1)
    worker.stop()
    _post_mortem(ledger, last, emission_ids, fault_log)
    result = {
        **last,
        "worker_starts": worker.starts,
        "broker_pauses": 1,
        "seconds": round(time.monotonic() - started, 1),
    }
    redis_proc.terminate()
    redis_proc.wait(10)
    print(json.dumps(result, indent=2))
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    sys.exit(0 if result.get("lost") == 0 else 1)


if __name__ == "__main__":
    main()
