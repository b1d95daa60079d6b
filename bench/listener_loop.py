"""The cost of one listener loop per process: an async no-op listener call, three ways, side by side.

- ``shared loop``: ``run_coroutine`` (the loop runs in a thread of its own; every pool thread
  submits to it): what the worker does now.
- ``loop per thread``: the calling thread runs its own loop with ``run_until_complete`` (what the
  worker did before: cheaper per call, but one loop per thread under ``-P threads``).
- ``asyncio.run()`` per call.

Also 4 threads calling at once (``-P threads -c 4``): calls/s through the shared loop.

``python -m bench.listener_loop`` writes bench/results/listener_loop.json and prints the figures.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import ratio, summary
from litestar_celery_events.runtime.event_loop import run_coroutine

CALLS = 3_000
REPS = 5
THREADS = 4
RESULTS = Path(__file__).parent / "results" / "listener_loop.json"


async def _noop() -> None:
    return None


def _per_call_us(call: Any, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - start) / calls * 1e6


def _threads_calls_per_s(threads: int, calls: int) -> float:
    barrier = threading.Barrier(threads + 1)

    def work() -> None:
        barrier.wait()
        for _ in range(calls):
            run_coroutine(_noop())

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    barrier.wait()
    start = time.perf_counter()
    for worker in workers:
        worker.join()
    return threads * calls / (time.perf_counter() - start)


def main() -> dict[str, Any]:
    own_loop = asyncio.new_event_loop()
    shared: list[float] = []
    per_thread: list[float] = []
    per_call: list[float] = []
    threaded: list[float] = []
    try:
        run_coroutine(_noop())  # start the loop thread outside the timings
        for _ in range(REPS):
            shared.append(_per_call_us(lambda: run_coroutine(_noop()), CALLS))
            per_thread.append(_per_call_us(lambda: own_loop.run_until_complete(_noop()), CALLS))
            per_call.append(_per_call_us(lambda: asyncio.run(_noop()), CALLS // 3))
            threaded.append(_threads_calls_per_s(THREADS, CALLS // THREADS))
    finally:
        own_loop.close()
    results = {
        "calls": CALLS,
        "reps": REPS,
        "shared_loop_us": summary(shared),
        "loop_per_thread_us": summary(per_thread),
        "asyncio_run_us": summary(per_call),
        "shared_over_loop_per_thread": ratio(shared, per_thread),
        "asyncio_run_over_shared": ratio(per_call, shared),
        f"shared_loop_{THREADS}_threads_calls_per_s": summary(threaded),
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    figures = main()
    for key, value in figures.items():
        if isinstance(value, dict):
            print(f"{key}: median {value['median']:.2f} (min {value['min']:.2f}, max {value['max']:.2f})")
