"""One event loop per worker process, in a thread of its own, for every async listener of the process.

All pool threads (prefork's one, solo's one, every thread of ``-P threads``) submit their
coroutines to the same loop, so what the app's lifespan created on it (a connection pool, an
engine, an HTTP client) is the loop-bound resource every async listener of the process uses.
``asyncio.run()`` per task would create and close a loop every time: slower, and it breaks
connection pools bound to the loop they were created on. The loop keeps running between tasks,
so background tasks the app's start-up created go on as they do in the web process.

A forked child gets a loop of its own, never its parent's (the parent's loop thread does not
exist in the child).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ("close_loop", "process_loop", "run_coroutine")

T = TypeVar("T")

logger = logging.getLogger("litestar_celery_events.worker")

LOOP_THREAD_NAME = "celery-events-loop"
CLOSE_TIMEOUT_S = 5.0


class _ProcessLoop:
    """The loop and the daemon thread that runs it forever."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(started,), name=LOOP_THREAD_NAME, daemon=True)
        self.thread.start()
        started.wait()

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(started.set)
        self.loop.run_forever()

    def close(self, timeout_s: float) -> None:
        if self.loop.is_closed():
            return
        if self.loop.is_running():
            future = asyncio.run_coroutine_threadsafe(self.loop.shutdown_asyncgens(), self.loop)
            try:
                future.result(timeout_s)
            except Exception:  # closing anyway
                logger.warning("async generators did not close within %.1fs", timeout_s, exc_info=True)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout_s)
        if self.thread.is_alive():
            logger.warning("the event loop thread did not stop within %.1fs; left running", timeout_s)
            return
        self.loop.close()


_current: _ProcessLoop | None = None
_lock = threading.Lock()


def _process_loop() -> _ProcessLoop:
    global _current
    current = _current
    if current is not None and current.pid == os.getpid() and not current.loop.is_closed():
        return current
    with _lock:
        if _current is None or _current.pid != os.getpid() or _current.loop.is_closed():
            _current = _ProcessLoop()
        return _current


def process_loop() -> asyncio.AbstractEventLoop:
    """This process's listener loop (started on first use; a forked child starts its own)."""
    return _process_loop().loop


def run_coroutine(coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
    """Run ``coro`` on the process loop and wait for its result, from any thread but the loop's own.

    If the wait ends early (``timeout_s``, or Celery's soft time limit raised in this thread), the
    coroutine is cancelled rather than left running on the loop.
    """
    state = _process_loop()
    if threading.current_thread() is state.thread:
        coro.close()
        raise RuntimeError("run_coroutine() called from the listener loop itself: await the coroutine instead")
    future = asyncio.run_coroutine_threadsafe(coro, state.loop)
    try:
        return future.result(timeout_s)
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise TimeoutError(f"coroutine did not finish within {timeout_s}s") from None
    except BaseException:
        future.cancel()
        raise


def close_loop(timeout_s: float = CLOSE_TIMEOUT_S) -> None:
    """Stop and close this process's loop, if it has one (at process end; a later use starts a new one)."""
    global _current
    with _lock:
        current, _current = _current, None
    if current is not None and current.pid == os.getpid():
        current.close(timeout_s)
