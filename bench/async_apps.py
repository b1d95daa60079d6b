"""The app of the async-listener benchmark: ``celery -A bench.async_worker worker`` loads it.

Env ``BENCH_ASYNC_CONCURRENCY`` (a number) turns on the asyncio pool, unset keeps prefork;
``BENCH_PREFETCH_MULTIPLIER`` overrides Celery's prefetch multiplier.
Listeners: the 50 ms listener (``await asyncio.sleep(0.05)``), an async no-op, a CPU-bound sync
listener, and the 50 ms listener that first records emit -> start latency. The arq and saq
workers (bench/anchors/) run the same coroutines.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from litestar import Litestar

from litestar_celery_events import CeleryEventsConfig, CeleryEventsPlugin, listener

__all__ = ("CPU_LOOPS", "QUEUE", "SLEEP_S", "create_app", "cpu_work")

QUEUE = "bench-async"
SLEEP_S = 0.05
CPU_LOOPS = 20_000
"""About 1 ms of pure-Python work on this machine: the GIL, not waiting, bounds it."""


def cpu_work() -> int:
    total = 0
    for i in range(CPU_LOOPS):
        total += i * i % 7
    return total


@listener("bench_sleep")
async def on_sleep(**kwargs: Any) -> None:
    await asyncio.sleep(SLEEP_S)


@listener("bench_async_noop")
async def on_async_noop(**kwargs: Any) -> None:
    pass


@listener("bench_cpu")
def on_cpu(**kwargs: Any) -> None:
    cpu_work()


@listener("bench_sync_sleep")
def on_sync_sleep(**kwargs: Any) -> None:
    """A sync listener waiting on I/O (a blocking client): the other half of a mixed app."""
    time.sleep(SLEEP_S)


@listener("bench_sleep_latency")
async def on_sleep_latency(t: float, **kwargs: Any) -> None:
    started = time.time()
    with open(Path(os.environ["BENCH_LATENCY_FILE"]), "a", encoding="ascii") as out:
        out.write(f"{started - t:.6f}\n")
    await asyncio.sleep(SLEEP_S)


def create_app() -> Litestar:
    concurrency = os.environ.get("BENCH_ASYNC_CONCURRENCY")
    prefetch = os.environ.get("BENCH_PREFETCH_MULTIPLIER")  # to compare prefetch settings
    config = CeleryEventsConfig(
        celery_config={"worker_prefetch_multiplier": int(prefetch)} if prefetch else {},
        broker_url=os.environ["BENCH_REDIS_URL"],
        default_queue=os.environ.get("BENCH_ASYNC_QUEUE", QUEUE),
        data_dir=os.environ.get("BENCH_DATA_DIR"),
        async_concurrency=int(concurrency) if concurrency else None,
    )
    return Litestar(
        listeners=[on_sleep, on_async_noop, on_cpu, on_sync_sleep, on_sleep_latency],
        plugins=[CeleryEventsPlugin(config)],
    )
