"""One long-lived event loop per worker process (and thread) for async listeners.

``asyncio.run()`` per task would create and close a loop every time: slower, and it breaks
connection pools bound to the loop they were created on.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ("close_loop", "run_coroutine")

T = TypeVar("T")

_local = threading.local()


def _loop() -> asyncio.AbstractEventLoop:
    loop: asyncio.AbstractEventLoop | None = getattr(_local, "loop", None)
    if loop is None or loop.is_closed() or getattr(_local, "pid", None) != os.getpid():
        loop = asyncio.new_event_loop()  # a forked child gets its own loop, never its parent's
        _local.loop = loop
        _local.pid = os.getpid()
    return loop


def run_coroutine(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion on this process's persistent loop."""
    return _loop().run_until_complete(coro)


def close_loop() -> None:
    """Close this thread's loop, if it has one (a thread that ran async listeners and is done)."""
    loop: asyncio.AbstractEventLoop | None = getattr(_local, "loop", None)
    if loop is not None and not loop.is_closed():
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    _local.loop = None
