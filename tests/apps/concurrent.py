"""The app of the async-concurrency tests: ``async_concurrency`` on, listeners that record their runs.

Each run appends one JSON line to env RECORD_FILE (listener, pid, thread, times). Env
VISIBILITY_TIMEOUT_S shortens Redis's redelivery of unacknowledged messages (the kill test).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from litestar import Litestar

from litestar_celery_events import CeleryEventsConfig, CeleryEventsPlugin, listener
from tests.apps.reliability import record

CONCURRENCY = 100
logger = logging.getLogger("tests.apps.concurrent")


def _flag(name: str) -> Path:
    return Path(os.environ.get("RECORD_FILE", "/tmp/records.jsonl")).with_suffix(f".{name}")


@listener("nap")
async def nap(n: int, seconds: float) -> None:
    """Logs before and after its sleep: each line must carry its own emission's log context."""
    started = time.time()
    logger.warning("nap %d starts", n)
    await asyncio.sleep(seconds)
    logger.warning("nap %d ends", n)
    record("nap", n=n, started=started, ended=time.time())


@listener("flaky", max_retries=2, default_retry_delay=0.2, retry_backoff=False)
async def flaky(n: int) -> None:
    """Fails on its first attempt only."""
    record("flaky:attempt", n=n)
    flag = _flag(f"flaky-{n}")
    if not flag.exists():
        flag.touch()
        raise ConnectionError(f"mail server busy for {n}")
    record("flaky", n=n)


@listener("flaky")
async def flaky_sibling(n: int) -> None:
    record("flaky_sibling", n=n)


@listener("doomed", max_retries=0)
async def doomed(n: int) -> None:
    raise RuntimeError(f"card declined for order {n}")


@listener("polite_timeout", soft_time_limit=0.5, time_limit=10, max_retries=0)
async def polite_timeout() -> None:
    """Catches the soft time limit's cancellation, cleans up, and returns normally."""
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        record("polite_timeout:cancelled")
        await asyncio.sleep(0.01)  # cleanup may still await
        record("polite_timeout:cleaned_up")


@listener("rude_timeout", soft_time_limit=0.5, time_limit=10, max_retries=0)
async def rude_timeout() -> None:
    """Lets the cancellation escape: the task fails with SoftTimeLimitExceeded."""
    await asyncio.sleep(30)


@listener("stuck", time_limit=1, max_retries=0)
async def stuck() -> None:
    """Ignores every cancellation: the hard limit fails the task all the same."""
    for _ in range(50):
        try:
            await asyncio.sleep(0.1)
        except asyncio.CancelledError:
            record("stuck:cancelled")


@listener("blocking")
def blocking(n: int) -> None:
    """A sync listener: must run on a thread of its own, not the loop's."""
    try:
        asyncio.get_running_loop()
        on_loop = True
    except RuntimeError:
        on_loop = False
    started = time.time()
    time.sleep(0.5)
    record("blocking", n=n, thread=threading.current_thread().name, on_loop=on_loop, started=started, ended=time.time())


@listener("slow")
async def slow(seconds: float) -> None:
    record("slow:start")
    await asyncio.sleep(seconds)
    record("slow:done")


def create_app() -> Litestar:
    celery_config: dict[str, Any] = {}
    visibility = os.environ.get("VISIBILITY_TIMEOUT_S")
    if visibility and os.environ.get("CELERY_BROKER_URL", "").startswith("redis"):
        options = {"visibility_timeout": float(visibility), "unacked_restore_throttle": 1}
        celery_config["broker_transport_options"] = options
    config = CeleryEventsConfig(
        default_queue=os.environ.get("TEST_QUEUE"), async_concurrency=CONCURRENCY, celery_config=celery_config
    )
    listeners = [nap, flaky, flaky_sibling, doomed, polite_timeout, rude_timeout, stuck, blocking, slow]
    return Litestar(listeners=listeners, plugins=[CeleryEventsPlugin(config)])
