"""Async listeners at asyncio concurrency: one worker, the same 50 ms listener, side by side.

Workers, all started once and alive together, each on a queue of its own (only one drains at a
time; the others wait idle):

- ``prefork``: ``celery -A bench.async_worker worker -P prefork -c 2`` (the documented command);
- ``async``: ``celery -A bench.async_worker worker`` with ``async_concurrency=100`` in the app's
  config and no pool flag at all;
- ``arq`` / ``saq``: the same coroutine, 100 jobs at once (bench/anchors.py, own virtualenv).

Rate: the worker is paused while its queue is filled with N jobs; then the jobs not finished yet
("pending": queued, reserved or running) are counted: rate = 0.8 N / the time pending takes to
fall from 0.9 N to 0.1 N (start-up and tail excluded).
Cases: the 50 ms listener (``await asyncio.sleep(0.05)``), an async no-op, a CPU-bound sync
listener (~1 ms of Python), and a mixed app (a 50 ms async listener and a 50 ms blocking sync
one, alternating). Latency: emit -> listener start at 200 events/s with the 50 ms listener.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.anchors import pending_key
from bench.common import ROOT, CeleryWorker, RedisServer, ratio, summary, wait_for
from bench.e2e import WORKER_FLAGS, latency
from tests.helpers import LoggedProcess

__all__ = ("ANCHORS_PYTHON", "run_async_listeners")

ANCHORS_PYTHON = ROOT / ".venv-anchors" / "bin" / "python"
CONCURRENCY = 100
QUEUES = {name: f"bench-async-{name}" for name in ("prefork", "async", "arq", "saq")}
CELERY_PENDING = "unacked"
"""kombu's Redis hash of delivered, not yet acknowledged messages (acks_late: until the listener ends)."""
LATENCY_RATE = 200.0


class Systems:
    """The four workers and how to fill each one's queue and count what it has not finished."""

    def __init__(self, redis: RedisServer, folder: Path) -> None:
        self.redis = redis
        self.client = redis.client()
        env = {"BENCH_REDIS_URL": redis.url, "BENCH_DATA_DIR": str(folder / "data")}
        env["BENCH_LATENCY_FILE"] = str(folder / "latency.txt")
        os.environ.update(env)
        flags = ["--loglevel", "WARNING", *WORKER_FLAGS]
        self.workers: dict[str, LoggedProcess] = {
            "prefork": CeleryWorker(
                "bench.async_worker", ["-P", "prefork", "-c", "2", "-Q", QUEUES["prefork"], *flags],
                {**env, "BENCH_ASYNC_QUEUE": QUEUES["prefork"]}, folder / "prefork.log",
            ),
            "async": CeleryWorker(  # no -P, no -c: the app's config picks the pool
                "bench.async_worker", ["-Q", QUEUES["async"], *flags],
                {**env, "BENCH_ASYNC_QUEUE": QUEUES["async"], "BENCH_ASYNC_CONCURRENCY": str(CONCURRENCY)},
                folder / "async.log",
            ),
        }  # fmt: skip
        for system in ("arq", "saq"):
            argv = [str(ANCHORS_PYTHON), "-m", "bench.anchors", system, "work", redis.url, QUEUES[system]]
            self.workers[system] = LoggedProcess([*argv, str(CONCURRENCY)], {}, folder / f"{system}.log")

    def fill(self, system: str, listeners: list[str], n: int) -> None:
        queue = QUEUES[system]
        if system in ("arq", "saq"):
            argv = [str(ANCHORS_PYTHON), "-m", "bench.anchors", system, "fill", self.redis.url, queue]
            subprocess.run([*argv, listeners[0], str(n)], cwd=ROOT, check=True, timeout=120)
            return
        from bench.e2e import fill

        per_listener = n // len(listeners)
        for start in range(0, per_listener, 250):  # listeners alternate in batches of 250
            for name in listeners:
                fill(self.redis, f"events.{name}", queue, min(250, per_listener - start))

    def pending(self, system: str) -> int:
        queue = QUEUES[system]
        if system in ("arq", "saq"):
            return int(self.client.zcard(pending_key(system, queue)))
        return int(self.client.llen(queue)) + int(self.client.hlen(CELERY_PENDING))

    def check_alive(self, system: str) -> None:
        worker = self.workers[system]
        if worker.proc.poll() is not None:
            raise RuntimeError(f"{system} worker exited with {worker.proc.returncode}:\n{worker.output()[-3000:]}")

    def warm_up(self, system: str) -> None:
        self.fill(system, ["bench_async_noop"], 20)

        def drained() -> bool:
            self.check_alive(system)
            return self.pending(system) == 0

        wait_for(drained, 90, f"the {system} worker to consume", 0.05)

    def rate(self, system: str, listeners: list[str], n: int) -> float:
        """Finished jobs per second while the pending count falls from 90% to 10% of ``n``.

        The worker is paused (SIGSTOP to its process group) while its queue is filled, so that
        a slow filler (arq and saq enqueue one job per call) never limits the rate.
        """
        group = self.workers[system].proc.pid  # each worker leads its own session
        os.killpg(group, signal.SIGSTOP)
        try:
            self.fill(system, listeners, n)
        finally:
            os.killpg(group, signal.SIGCONT)
        skip = n // 10

        def below(level: int) -> Callable[[], float | bool]:
            def check() -> float | bool:
                self.check_alive(system)
                return self.pending(system) <= level and time.perf_counter()

            return check

        t0 = wait_for(below(n - skip), 120, f"the {system} worker to start", 0.002)
        t1 = wait_for(below(skip), 300, f"the {system} worker to drain", 0.002)
        wait_for(lambda: self.pending(system) == 0, 120, f"the {system} worker to finish")
        return (n - 2 * skip) / (t1 - t0)

    def stop(self) -> None:
        stoppers = [threading.Thread(target=w.stop) for w in self.workers.values()]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join()


def _cases(quick: bool) -> list[tuple[str, str, list[str], int]]:
    """``(case, system, listeners, jobs)`` in one repetition's order."""
    big, small = (1_500, 150) if quick else (4_000, 300)
    sleep = ["bench_sleep"]
    return [
        ("sleep_50ms", "prefork", sleep, small),
        ("sleep_50ms", "async", sleep, big),
        ("sleep_50ms", "arq", sleep, big),
        ("sleep_50ms", "saq", sleep, big),
        ("noop", "prefork", ["bench_async_noop"], big),
        ("noop", "async", ["bench_async_noop"], big),
        ("noop", "arq", ["bench_async_noop"], big),
        ("noop", "saq", ["bench_async_noop"], big),
        ("cpu_sync", "prefork", ["bench_cpu"], big // 4),
        ("cpu_sync", "async", ["bench_cpu"], big // 4),
        ("mixed", "prefork", ["bench_sleep", "bench_sync_sleep"], small),
        ("mixed", "async", ["bench_sleep", "bench_sync_sleep"], big // 2),
    ]


def run_async_listeners(redis: RedisServer, reps: int, quick: bool = False) -> dict[str, Any]:
    if not ANCHORS_PYTHON.exists():
        raise RuntimeError(f"{ANCHORS_PYTHON} is missing: `make bench` creates it (bench/anchors-requirements.txt)")
    folder = Path(tempfile.mkdtemp(prefix="bench-async-"))
    systems = Systems(redis, folder)
    rates: dict[str, dict[str, list[float]]] = {}
    latencies: list[dict[str, float]] = []
    from bench.async_apps import create_app

    os.environ["BENCH_ASYNC_QUEUE"] = QUEUES["async"]
    emitter = create_app().event_emitter
    try:
        for system in systems.workers:
            systems.warm_up(system)
        emitter.start()
        cases = _cases(quick)
        for rep in range(reps):
            for case, system, listeners, n in cases if rep % 2 == 0 else cases[::-1]:
                rates.setdefault(case, {}).setdefault(system, []).append(systems.rate(system, listeners, n))
            send: Callable[[float], None] = lambda t: emitter.emit("bench_sleep_latency", t=t)  # noqa: E731
            latencies.append(
                latency(redis, send, LATENCY_RATE, 3.0 if quick else 5.0, Path(os.environ["BENCH_LATENCY_FILE"]))
            )
            wait_for(lambda: systems.pending("async") == 0, 60, "the latency run to finish")
    finally:
        emitter.stop()
        systems.stop()
    return _summarise(rates, latencies)


def _summarise(rates: dict[str, dict[str, list[float]]], latencies: list[dict[str, float]]) -> dict[str, Any]:
    sleep = rates["sleep_50ms"]
    return {
        "concurrency": CONCURRENCY,
        "events_per_s": {case: {system: summary(v) for system, v in by.items()} for case, by in rates.items()},
        "ratio_sleep_vs_prefork": ratio(sleep["async"], sleep["prefork"]),
        "ratio_sleep_vs_arq": ratio(sleep["async"], sleep["arq"]),
        "ratio_sleep_vs_saq": ratio(sleep["async"], sleep["saq"]),
        "ratio_noop_vs_prefork": ratio(rates["noop"]["async"], rates["noop"]["prefork"]),
        "ratio_cpu_vs_prefork": ratio(rates["cpu_sync"]["async"], rates["cpu_sync"]["prefork"]),
        "ratio_mixed_vs_prefork": ratio(rates["mixed"]["async"], rates["mixed"]["prefork"]),
        "latency_rate_per_s": LATENCY_RATE,
        "latency_p50_ms": summary([x["p50_ms"] for x in latencies]),
        "latency_p99_ms": summary([x["p99_ms"] for x in latencies]),
    }
