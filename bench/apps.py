"""The apps the benchmarks run, all on the private Redis named by env ``BENCH_REDIS_URL``.

- ``create_events_app``: a Litestar app with ``CeleryEventsPlugin`` (routes ``/noemit``, ``/emit``,
  ``/naive`` (plain ``apply_async`` in the handler), ``/naive-pool`` (``apply_async`` handed to a
  thread pool), ``/probe``, ``/stats``); the benchmark workers load the same app.
- ``create_simple_app``: the same routes on Litestar's own ``SimpleEventEmitter``.

Every emitting route times its own emit call (``perf_counter_ns``) so ``/stats`` reports what
the emit costs inside a real request under load.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from litestar import Litestar, Request, get
from litestar.events import listener as litestar_listener

from bench.common import percentile
from litestar_celery_events import CeleryEventsConfig, CeleryEventsPlugin, listener

__all__ = ("EMAIL", "create_events_app", "create_simple_app")

EMAIL = "user@example.com"
WEB_QUEUE = "bench-web"
NAIVE_QUEUE = "bench-naive"
_emit_ns: list[int] = []
_emitted = [0]
_pool: list[ThreadPoolExecutor] = []


def broker_url() -> str:
    url = os.environ.get("BENCH_REDIS_URL")
    if not url:
        raise RuntimeError("BENCH_REDIS_URL is not set: benchmarks run only against their private redis-server")
    return url


# Listeners: no-ops, plus one that records emit -> listener start latency.


@listener("user_created", "bench_sync")
def on_user_created(**kwargs: Any) -> None:
    pass


@listener("bench_async")
async def on_bench_async(**kwargs: Any) -> None:
    pass


async def _noop() -> None:
    pass


@listener("bench_asyncio_run")
def on_bench_asyncio_run(**kwargs: Any) -> None:
    """The same async no-op run the naive way: a new event loop per call."""
    asyncio.run(_noop())


@listener("bench_latency")
def on_bench_latency(t: float, **kwargs: Any) -> None:
    started = time.time()
    with open(Path(os.environ["BENCH_LATENCY_FILE"]), "a", encoding="ascii") as out:
        out.write(f"{started - t:.6f}\n")


@litestar_listener("user_created")
async def simple_on_user_created(**kwargs: Any) -> None:
    pass


# Routes.


def _timed(fn: Any, *args: Any, **kwargs: Any) -> None:
    t0 = time.perf_counter_ns()
    fn(*args, **kwargs)
    _emit_ns.append(time.perf_counter_ns() - t0)
    _emitted[0] += 1


@get("/noemit")
async def noemit(request: Request[Any, Any, Any]) -> dict[str, bool]:
    return {"ok": True}


@get("/probe")
async def probe(request: Request[Any, Any, Any]) -> dict[str, bool]:
    return {"ok": True}


@get("/emit")
async def emit(request: Request[Any, Any, Any]) -> dict[str, bool]:
    _timed(request.app.emit, "user_created", email=EMAIL, n=_emitted[0])
    return {"ok": True}


@get("/naive")
async def naive(request: Request[Any, Any, Any]) -> dict[str, bool]:
    from bench.plain_worker import noop

    _timed(noop.apply_async, kwargs={"email": EMAIL, "n": _emitted[0]}, queue=NAIVE_QUEUE)
    return {"ok": True}


@get("/naive-pool")
async def naive_pool(request: Request[Any, Any, Any]) -> dict[str, bool]:
    from bench.plain_worker import noop

    if not _pool:
        _pool.append(ThreadPoolExecutor(max_workers=8, thread_name_prefix="apply-async"))
    _timed(_pool[0].submit, noop.apply_async, kwargs={"email": EMAIL, "n": _emitted[0]}, queue=NAIVE_QUEUE)
    return {"ok": True}


@get("/stats")
async def stats(request: Request[Any, Any, Any]) -> dict[str, Any]:
    """Emit-call timings since the last call (then reset), and what waits in memory."""
    timings = list(_emit_ns)
    _emit_ns.clear()
    emitted, _emitted[0] = _emitted[0], 0
    backlog = 0
    if _pool:  # what the thread-pool variant still holds: cancel it, the run is over
        pool = _pool.pop()
        backlog = pool._work_queue.qsize()
        await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)
    emitter = request.app.event_emitter
    publisher = getattr(emitter, "publisher", None)
    return {
        "emitted": emitted,
        "emit_p50_us": percentile(timings, 50) / 1000,
        "emit_p99_us": percentile(timings, 99) / 1000,
        "pool_backlog": backlog,
        "buffered": publisher.pending if publisher is not None else 0,
        "threads": threading.active_count(),
    }


ROUTES = [noemit, probe, emit, naive, naive_pool, stats]


def create_events_app(queue: str | None = None) -> Litestar:
    """The benchmark app on ``CeleryEventsPlugin``; event tasks go to ``queue`` (env BENCH_EVENTS_QUEUE)."""
    config = CeleryEventsConfig(
        broker_url=broker_url(),
        default_queue=queue or os.environ.get("BENCH_EVENTS_QUEUE", WEB_QUEUE),
        data_dir=os.environ.get("BENCH_DATA_DIR"),
    )
    return Litestar(
        route_handlers=ROUTES,
        listeners=[on_user_created, on_bench_async, on_bench_asyncio_run, on_bench_latency],
        plugins=[CeleryEventsPlugin(config)],
    )


def create_simple_app() -> Litestar:
    """The same routes on Litestar's built-in ``SimpleEventEmitter`` (listeners run in-process)."""
    return Litestar(route_handlers=ROUTES, listeners=[simple_on_user_created])
