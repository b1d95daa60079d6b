"""A plain Celery app, the baseline: ``celery -A bench.plain_worker worker``.

Same broker and JSON-only settings as the events app; no-op tasks with Celery's defaults.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from celery import Celery

from bench import worker_profiling
from litestar_celery_events.celery_app import secure_defaults

__all__ = ("app", "latency", "noop", "noop_asyncio_run", "noop_late")

app = Celery("bench-plain", set_as_current=False)
app.conf.update(secure_defaults(), broker_url=os.environ.get("BENCH_REDIS_URL", "memory://"))


@app.task(name="bench.noop", ignore_result=True)
def noop(*args: Any, **kwargs: Any) -> None:
    pass


@app.task(name="bench.noop_late", ignore_result=True, acks_late=True, reject_on_worker_lost=True)
def noop_late(*args: Any, **kwargs: Any) -> None:
    """The no-op with the delivery guarantees event tasks have: acknowledged after it ran."""


async def _noop() -> None:
    pass


@app.task(name="bench.noop_asyncio_run", ignore_result=True)
def noop_asyncio_run(*args: Any, **kwargs: Any) -> None:
    """An async no-op listener run the naive way: a new event loop per task."""
    asyncio.run(_noop())


@app.task(name="bench.latency", ignore_result=True)
def latency(t: float, **kwargs: Any) -> None:
    started = time.time()
    with open(Path(os.environ["BENCH_LATENCY_FILE"]), "a", encoding="ascii") as out:
        out.write(f"{started - t:.6f}\n")


worker_profiling.install()
