"""arq and saq running the benchmark's coroutines: the asyncio anchors of ``bench.async_listeners``.

They run in a virtualenv of their own (``.venv-anchors``, made by ``make bench``): arq pins
redis-py below 6 and pulls hiredis, which would change the redis-py every other benchmark
measures. Nothing here imports the library or the rest of ``bench``.

    python -m bench.anchors arq|saq work <redis_url> <queue> <concurrency>
    python -m bench.anchors arq|saq fill <redis_url> <queue> <function> <n>

Each worker runs up to ``concurrency`` jobs at once (arq ``max_jobs``, saq ``concurrency``),
keeps no results, and otherwise uses its defaults except arq's ``poll_delay`` (0.5 s by
default: arq would then fetch new jobs only twice a second; 10 ms lets it run at its best).
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

__all__ = ("ARQ_POLL_DELAY_S", "SLEEP_S", "pending_key")

SLEEP_S = 0.05
"""The listener of the benchmark: ``await asyncio.sleep(SLEEP_S)``."""
ARQ_POLL_DELAY_S = 0.01


async def bench_sleep(ctx: Any, **kwargs: Any) -> None:
    await asyncio.sleep(SLEEP_S)


async def bench_async_noop(ctx: Any, **kwargs: Any) -> None:
    pass


FUNCTIONS = {"bench_sleep": bench_sleep, "bench_async_noop": bench_async_noop}


def pending_key(system: str, queue: str) -> str:
    """The sorted set whose size is the jobs not finished yet (queued or running)."""
    return queue if system == "arq" else f"saq:{queue}:incomplete"


def _arq_work(url: str, queue: str, concurrency: int) -> None:
    from arq.connections import RedisSettings
    from arq.worker import Worker

    worker = Worker(
        functions=list(FUNCTIONS.values()),
        redis_settings=RedisSettings.from_dsn(url),
        queue_name=queue,
        max_jobs=concurrency,
        keep_result=0,
        poll_delay=ARQ_POLL_DELAY_S,
    )
    worker.run()


async def _arq_fill(url: str, queue: str, function: str, n: int) -> None:
    from arq import create_pool
    from arq.connections import RedisSettings

    pool = await create_pool(RedisSettings.from_dsn(url), default_queue_name=queue)
    for start in range(0, n, 500):
        await asyncio.gather(*(pool.enqueue_job(function, i=i) for i in range(start, min(n, start + 500))))
    await pool.aclose()


async def _saq_work(url: str, queue: str, concurrency: int) -> None:
    from saq import Queue, Worker

    worker = Worker(Queue.from_url(url, name=queue), functions=list(FUNCTIONS.values()), concurrency=concurrency)
    await worker.start()


async def _saq_fill(url: str, queue: str, function: str, n: int) -> None:
    from saq import Queue

    saq_queue = Queue.from_url(url, name=queue)
    await saq_queue.connect()
    for start in range(0, n, 500):
        await asyncio.gather(*(saq_queue.enqueue(function, i=i) for i in range(start, min(n, start + 500))))
    await saq_queue.disconnect()


def main(argv: list[str]) -> None:
    system, action, url, queue, *rest = argv
    if action == "work" and system == "arq":
        _arq_work(url, queue, int(rest[0]))
    elif action == "work" and system == "saq":
        asyncio.run(_saq_work(url, queue, int(rest[0])))
    elif action == "fill":
        fill = _arq_fill if system == "arq" else _saq_fill
        asyncio.run(fill(url, queue, rest[0], int(rest[1])))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
