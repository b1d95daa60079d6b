"""A Celery pool that runs many listeners at once in one worker process, on one asyncio loop.

``CeleryEventsConfig(async_concurrency=N)`` makes ``celery -A worker worker`` use it. The consumer
(Celery's main thread) hands every task to the loop thread; each task runs Celery's own tracer,
unchanged, in a greenlet of its own on that thread. When the tracer reaches an ``async def``
listener, the greenlet hands the coroutine to the loop and yields: up to N tasks wait on their
listeners at the same time, and one connection pool per process serves them all. Because the
tracer is Celery's, everything it does stays as it was: ``acks_late`` (the message is
acknowledged only after the listener finished), retries, ``on_failure`` and the failed-events
store, signals (the log and trace context of each task lives in its greenlet's contextvars).

- Sync listeners run on a thread pool (the greenlet waits for them), never on the loop.
- Soft time limit: the running listener coroutine is cancelled; it may catch
  ``asyncio.CancelledError`` and clean up; if the cancellation escapes, the task fails with
  ``SoftTimeLimitExceeded`` (retried like any error, as under prefork). Hard time limit: the task
  fails with ``TimeLimitExceeded`` exactly as when prefork kills a child, and its coroutine is
  cancelled and abandoned.
- A killed worker process leaves its unacknowledged messages to the broker, which redelivers them.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import os
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from billiard.einfo import ExceptionInfo
from billiard.exceptions import WorkerLostError
from celery import signals
from celery.concurrency.base import BasePool
from celery.exceptions import SoftTimeLimitExceeded

try:
    from greenlet import GreenletExit, getcurrent, greenlet
except ImportError as exc:  # an optional dependency: only this pool needs it
    raise ImportError(
        "CeleryEventsConfig(async_concurrency=...) needs greenlet: pip install 'litestar-celery-events[async]'"
    ) from exc

from litestar_celery_events.runtime import invoke
from litestar_celery_events.runtime.event_loop import process_loop, run_coroutine

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine

__all__ = ("AsyncListenerPool",)

logger = logging.getLogger("litestar_celery_events.worker")

MAX_SYNC_THREADS = 32
T = TypeVar("T")


@dataclass(eq=False)
class _Job:
    """One task handed to the pool by the consumer."""

    target: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    callback: Callable[[Any], Any] | None
    accept_callback: Callable[[int, float], Any] | None
    timeout_callback: Callable[[bool, float], Any] | None
    soft_timeout: float | None
    timeout: float | None
    settled: bool = False
    """Celery has been told the outcome (success, failure or hard time limit): no second word."""
    soft_expired: bool = False
    listener: asyncio.Future[Any] | None = None
    """The listener coroutine running now (what a soft time limit cancels)."""
    driver: asyncio.Task[None] | None = None
    timers: list[asyncio.TimerHandle] = field(default_factory=list)


class _TaskGreenlet(greenlet):  # type: ignore[misc]  # greenlet's stubs do not allow subclassing cleanly
    job: _Job
    pool: AsyncListenerPool


class AsyncListenerPool(BasePool):  # type: ignore[misc]  # celery is untyped
    """Up to ``limit`` tasks in flight on one event loop thread; sync listeners on threads."""

    body_can_be_buffer = True
    signal_safe = False
    task_join_will_block = True  # result.get() inside a listener would block the loop: Celery refuses it

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limit: int = int(self.limit or 1)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._replaced_runners: tuple[Any, Any] | None = None
        self._slots: asyncio.Semaphore | None = None
        self._in_flight = 0
        self._count_lock = threading.Lock()
        self._arrived: deque[_Job] = deque()
        self._wake_pending = False
        self._idle = threading.Event()
        self._idle.set()
        self.sync_executor = ThreadPoolExecutor(
            max_workers=min(self.limit, MAX_SYNC_THREADS), thread_name_prefix="celery-events-sync"
        )

    # Celery's side (consumer thread).

    def on_start(self) -> None:
        if _asked_for_prefork(sys.argv):
            logger.warning(
                "`-P prefork` was replaced by the asyncio pool that async_concurrency configures (Celery lets a "
                "configured worker_pool override its default pool name): use `-P processes -c N` for prefork"
            )
        # The process's listener loop: the app's lifespan runs on it too (``runtime.lifespan``
        # starts it after this pool), so what its start-up created is usable by every listener.
        self.loop = process_loop()
        self._replaced_runners = (invoke.run_async_listener, invoke.run_sync_listener)
        invoke.run_async_listener = _await_listener
        invoke.run_sync_listener = _call_sync_listener
        signals.worker_process_init.send(sender=None)  # tasks run in this process, as with solo

    def on_apply(
        self,
        target: Callable[..., Any],
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
        callback: Callable[[Any], Any] | None = None,
        accept_callback: Callable[[int, float], Any] | None = None,
        timeout_callback: Callable[[bool, float], Any] | None = None,
        soft_timeout: float | None = None,
        timeout: float | None = None,
        **_: Any,
    ) -> None:
        job = _Job(target, tuple(args or ()), dict(kwargs or {}), callback, accept_callback, timeout_callback,
                   soft_timeout, timeout)  # fmt: skip
        with self._count_lock:
            self._in_flight += 1
            self._idle.clear()
            self._arrived.append(job)
            wake, self._wake_pending = not self._wake_pending, True
        if wake:  # one wake-up of the loop for all jobs that arrive before it runs
            if self.loop is None:
                raise RuntimeError("AsyncListenerPool got a task before it was started")
            self.loop.call_soon_threadsafe(self._start_arrived)

    def on_stop(self) -> None:
        """Warm shutdown: the consumer stopped taking messages; let the tasks in flight finish.
        The loop stays: the app's lifespan ends on it at ``worker_shutdown``, then closes it."""
        self._idle.wait()
        self._closed()

    def on_terminate(self) -> None:
        """Cold shutdown: stop now. The tasks in flight are not run on (nor acknowledged): their
        messages go back to the queue (``acks_late``)."""
        self._closed()

    def _closed(self) -> None:
        if self._replaced_runners is not None:
            invoke.run_async_listener, invoke.run_sync_listener = self._replaced_runners
            self._replaced_runners = None
        self.sync_executor.shutdown(wait=False, cancel_futures=True)
        signals.worker_process_shutdown.send(sender=None, pid=os.getpid(), exitcode=0)

    def _get_info(self) -> dict[str, Any]:
        info: dict[str, Any] = super()._get_info()
        info.update({"max-concurrency": self.limit, "in-flight": self._in_flight, "processes": [os.getpid()]})
        return info

    @property
    def num_processes(self) -> int:
        return self.limit

    # The loop's side (loop thread).

    def _start_arrived(self) -> None:
        with self._count_lock:
            jobs, self._arrived = self._arrived, deque()
            self._wake_pending = False
        for job in jobs:
            job.driver = asyncio.get_running_loop().create_task(self._drive(job))

    async def _drive(self, job: _Job) -> None:
        if self._slots is None:  # made on the loop's thread, the first time it is needed
            self._slots = asyncio.Semaphore(self.limit)
        try:
            async with self._slots:
                self._arm_time_limits(job)
                await self._run_in_greenlet(job)
        finally:
            for timer in job.timers:
                timer.cancel()
            with self._count_lock:
                self._in_flight -= 1
                if self._in_flight == 0:
                    self._idle.set()

    async def _run_in_greenlet(self, job: _Job) -> None:
        """Run Celery's tracer in a greenlet; each awaitable it hands up is awaited here."""
        task_greenlet = _TaskGreenlet(_run_job)
        task_greenlet.job, task_greenlet.pool = job, self
        task_greenlet.gr_context = contextvars.copy_context()
        request: Any = task_greenlet.switch(job)
        while not task_greenlet.dead:
            try:
                value = await request
            except asyncio.CancelledError:
                if job.settled:  # hard time limit: Celery has failed the task; abandon it
                    task_greenlet.throw(GreenletExit)
                    return
                request = task_greenlet.throw(*sys.exc_info())
            except BaseException:  # noqa: BLE001 - handed back into the listener's caller
                request = task_greenlet.throw(*sys.exc_info())
            else:
                request = task_greenlet.switch(value)

    def _arm_time_limits(self, job: _Job) -> None:
        if job.soft_timeout:
            job.timers.append(asyncio.get_running_loop().call_later(job.soft_timeout, self._soft_limit, job))
        if job.timeout:
            job.timers.append(asyncio.get_running_loop().call_later(job.timeout, self._hard_limit, job))

    def _soft_limit(self, job: _Job) -> None:
        if job.settled:
            return
        job.soft_expired = True
        if job.timeout_callback is not None and job.soft_timeout:
            job.timeout_callback(True, job.soft_timeout)
        if job.listener is not None:
            job.listener.cancel()

    def _hard_limit(self, job: _Job) -> None:
        if job.settled:
            return
        job.settled = True
        if job.timeout_callback is not None and job.timeout:
            job.timeout_callback(False, job.timeout)  # Celery's own hard-limit path: on_failure, ack
        if job.driver is not None:
            job.driver.cancel()  # cancels the listener it awaits too


def _asked_for_prefork(argv: list[str]) -> bool:
    """``-P prefork`` / ``--pool prefork`` / ``--pool=prefork`` on the command line."""
    pairs = zip(argv, [*argv[1:], ""], strict=True)
    return any(flag in ("-P", "--pool") and value == "prefork" for flag, value in pairs) or "--pool=prefork" in argv


def _run_job(job: _Job) -> None:
    """Inside the task's greenlet: Celery's ``apply_target``, except that a task abandoned at its
    hard time limit never reports a second outcome."""
    if job.accept_callback is not None:
        job.accept_callback(os.getpid(), time.monotonic())
    try:
        result = job.target(*job.args, **job.kwargs)
    except GreenletExit:
        return
    except Exception:
        logger.exception("the Celery tracer raised; the task is failed")
        _settle(job, ExceptionInfo())
    except BaseException as exc:  # noqa: BLE001 - Celery's apply_target does the same
        try:
            raise WorkerLostError(repr(exc)) from exc
        except WorkerLostError:
            _settle(job, ExceptionInfo())
    else:
        _settle(job, result)


def _settle(job: _Job, result: Any) -> None:
    if job.settled:
        return
    job.settled = True
    if job.callback is not None:
        job.callback(result)  # Request.on_success: acknowledges the message (acks_late)


def _await_in_loop(awaitable: Awaitable[T]) -> T:
    """Hand ``awaitable`` to the driving coroutine and wait (switch) until it is done."""
    result: T = getcurrent().parent.switch(awaitable)
    return result


def _await_listener(coro: Coroutine[Any, Any, T]) -> T:
    """``invoke``'s hook for async listeners: the coroutine runs as a task on the loop, in a copy
    of this greenlet's context (the log and trace context of its Celery task)."""
    current = getcurrent()
    if not isinstance(current, _TaskGreenlet):
        return run_coroutine(coro)  # not inside the pool (a direct call): the old way
    job = current.job
    loop = asyncio.get_running_loop()  # the greenlet runs inside a task of the pool's loop
    listener = contextvars.copy_context().run(loop.create_task, coro)
    job.listener = listener
    if job.soft_expired:
        listener.cancel()
    try:
        return _await_in_loop(listener)
    except asyncio.CancelledError:
        if job.soft_expired:
            raise SoftTimeLimitExceeded(f"soft time limit ({job.soft_timeout}s) exceeded") from None
        raise
    finally:
        job.listener = None


def _call_sync_listener(fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
    """``invoke``'s hook for sync listeners: on the pool's threads, so the loop never blocks."""
    current = getcurrent()
    if not isinstance(current, _TaskGreenlet):
        return fn(*args, **kwargs)
    call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
    pool = current.pool
    return _await_in_loop(asyncio.get_running_loop().run_in_executor(pool.sync_executor, call))
