"""The Litestar app's lifespan in every worker process that runs listeners.

What the web process has when a listener runs there (``app.state`` filled by ``on_startup``, pools
from ``lifespan=[...]``, advanced-alchemy's engine) a worker process gets the same way: the app's
``lifespan()`` is entered once per process, on the process's listener loop, before the first
task, and left when the process ends.

Which process runs listeners depends on the pool:
- prefork (the default): each child. ``worker_process_init`` starts it; a start-up that raises is
  logged in the child, reported to the main process through a pipe, and the main process stops
  with exit code 1 (Celery's signal dispatch would otherwise swallow the error).
- solo, threads: the main process. A worker bootstep starts it before the consumer takes tasks
  (an error there is Celery's "Unrecoverable error", exit code 1); ``worker_shutdown`` ends it,
  after the pool has finished its tasks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import os
import sys
import threading
from contextlib import AsyncExitStack, contextmanager, suppress
from typing import TYPE_CHECKING, Any

from celery import bootsteps, signals
from celery.concurrency import get_implementation
from celery.concurrency.prefork import TaskPool as PreforkPool
from celery.platforms import EX_FAILURE
from celery.worker import state as worker_state

from litestar_celery_events.runtime.event_loop import close_loop, process_loop

if TYPE_CHECKING:
    from collections.abc import Iterator

    from celery import Celery
    from litestar import Litestar
    from litestar.datastructures import State
    from litestar.types import LifespanHook

    from litestar_celery_events.emitter import CeleryEventEmitter

__all__ = ("WorkerLifespan", "call_lifespan_hook", "install_worker_lifespan")

logger = logging.getLogger("litestar_celery_events.worker")

CANCEL_GRACE_S = 1.0
"""After the shutdown timeout: how long the cancelled rest of the shutdown may take to unwind."""
CELERY_PROC_ALIVE_TIMEOUT_S = 4.0
"""Celery's default ``worker_proc_alive_timeout``: a prefork child not up by then is SIGKILLed."""
CHILD_STARTUP_TIMEOUT_S = 60.0
"""What it becomes when the app's lifespan runs in the children (unless set to something else):
an app's start-up (connecting, warming caches) may take longer than 4 s, and a child killed for
it would be replaced by another killed child, forever."""


async def call_lifespan_hook(hook: LifespanHook, app: Litestar) -> None:
    """Call ``hook`` as Litestar calls ``on_startup`` hooks: with the app if it takes an argument."""
    result = hook(app) if inspect.signature(hook).parameters else hook()  # type: ignore[call-arg]
    if inspect.isawaitable(result):
        await result


class WorkerLifespan:
    """One process's lifespan: the app's (unless turned off) and the worker's own hooks.

    It is held by one task on the process loop from start to stop, so a lifespan context manager
    that opens a task group or a cancel scope exits in the task that entered it.
    """

    def __init__(
        self,
        app: Litestar,
        emitter: CeleryEventEmitter,
        run_app_lifespan: bool | None = None,
        state: State | None = None,
    ) -> None:
        self.app = app
        self.emitter = emitter
        self.config = emitter.config
        self.run_app_lifespan = self.config.worker_lifespan if run_app_lifespan is None else run_app_lifespan
        self.state = state
        """A state of the listeners' own (``inline_events``: the test's web side keeps ``app.state``)."""
        self._task: concurrent.futures.Future[None] | None = None
        self._stop: asyncio.Event | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start the emitter, enter the lifespan and run ``worker_on_startup``; raise what start-up raised."""
        self.emitter.publish_from_loop = False  # the process loop runs listeners: the thread publishes
        self.emitter.start()  # idempotent; listeners may emit, so every such process publishes
        started: concurrent.futures.Future[None] = concurrent.futures.Future()
        loop = process_loop()
        self._task = asyncio.run_coroutine_threadsafe(self._hold(started), loop)
        concurrent.futures.wait([started, self._task], return_when=concurrent.futures.FIRST_COMPLETED)
        if not started.done():
            self._task.result()  # the start-up raised: re-raise it here
        logger.debug("worker lifespan started in process %d", os.getpid())

    async def _hold(self, started: concurrent.futures.Future[None]) -> None:
        self._stop = asyncio.Event()
        stack = AsyncExitStack()
        with self._own_state():
            try:
                if self.run_app_lifespan:
                    await stack.enter_async_context(self.app.lifespan())
                for hook in reversed(self.config.worker_on_shutdown):
                    stack.push_async_callback(call_lifespan_hook, hook, self.app)
                for hook in self.config.worker_on_startup:
                    await call_lifespan_hook(hook, self.app)
            except BaseException:
                await stack.aclose()
                raise
        if self.state is not None:  # what start-up added, also for code that reads app.state directly
            for key, value in self.state.items():
                if key not in self.app.state:
                    self.app.state[key] = value
        started.set_result(None)
        try:
            await self._stop.wait()
        finally:
            with self._own_state():
                await stack.aclose()

    @contextmanager
    def _own_state(self) -> Iterator[None]:
        """While the lifespan starts or stops, ``app.state`` is the listeners' own state, if they have one."""
        if self.state is None:
            yield
            return
        web_state, self.app.state = self.app.state, self.state
        try:
            yield
        finally:
            self.app.state = web_state

    def stop(self) -> None:
        """Run the shutdown side within ``worker_shutdown_timeout_s``; errors are logged, never raised."""
        task, stop = self._task, self._stop
        self._task = None
        if task is not None and stop is not None and not task.done():
            process_loop().call_soon_threadsafe(stop.set)
            timeout_s = self.config.worker_shutdown_timeout_s
            try:
                task.result(timeout_s)
            except concurrent.futures.TimeoutError:
                task.cancel()  # the rest of the shutdown runs with CancelledError: let it unwind first
                concurrent.futures.wait([task], timeout=CANCEL_GRACE_S)
                logger.error("the app's shutdown did not finish within %.1fs (worker_shutdown_timeout_s)", timeout_s)
            except Exception:
                logger.exception("the app's shutdown failed in worker process %d", os.getpid())
        if self.emitter.running:
            self.emitter.stop()
        close_loop()


def _report_and_exit(pipe_fd: int | None, exc: BaseException) -> None:
    """A pool child whose start-up failed: tell the main process, then leave."""
    logger.critical("the app's start-up failed in worker process %d: %r", os.getpid(), exc, exc_info=exc)
    if pipe_fd is not None:
        message = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:2000] + "\n"
        with suppress(OSError):
            os.write(pipe_fd, message.encode(errors="replace"))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EX_FAILURE)


def _watch_children(read_fd: int) -> None:
    """Main process of a prefork worker: the first start-up failure a child reports stops the worker."""

    def watch() -> None:
        with os.fdopen(read_fd, "rb") as pipe:
            line = pipe.readline()
        if line:
            logger.critical(
                "stopping the worker: the app's start-up failed in a pool process: %s "
                "(fix it, or set CeleryEventsConfig(worker_lifespan=False) if that start-up is web-only)",
                line.decode(errors="replace").strip(),
            )
            worker_state.should_stop = EX_FAILURE  # the consumer loop raises WorkerShutdown(1)

    threading.Thread(target=watch, name="celery-events-startup-watch", daemon=True).start()


class _Processes:
    """Which process of this worker runs listeners, decided in the main process at ``worker_init``."""

    def __init__(self) -> None:
        self.main_pid: int | None = None
        self.children_run_tasks = False
        self.failure_fd: int | None = None


def install_worker_lifespan(celery_app: Celery, app: Litestar, emitter: CeleryEventEmitter) -> WorkerLifespan:
    """Connect the lifespan to ``celery_app``'s worker signals (``celery -A worker worker`` only)."""
    lifespan = WorkerLifespan(app, emitter)
    processes = _Processes()
    if float(celery_app.conf.worker_proc_alive_timeout) == CELERY_PROC_ALIVE_TIMEOUT_S:
        celery_app.conf.worker_proc_alive_timeout = CHILD_STARTUP_TIMEOUT_S
    default_pool = celery_app.conf.worker_pool

    def on_worker_init(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is not celery_app:
            return
        processes.main_pid = os.getpid()
        pool = get_implementation(getattr(sender, "pool_cls", None) or default_pool)
        processes.children_run_tasks = isinstance(pool, type) and issubclass(pool, PreforkPool)
        if processes.children_run_tasks:
            read_fd, processes.failure_fd = os.pipe()  # created before the pool forks: children inherit it
            _watch_children(read_fd)

    def in_pool_child() -> bool:
        return processes.children_run_tasks and os.getpid() != processes.main_pid

    def on_child_start(**_: Any) -> None:
        if not in_pool_child():
            return
        if emitter.outbox is not None:
            emitter.outbox.relays_orphans = False  # the worker's main process relays for all of them
        try:
            lifespan.start()
        except BaseException as exc:  # noqa: BLE001 - reported, then the child exits
            _report_and_exit(processes.failure_fd, exc)

    def on_child_end(**_: Any) -> None:
        if in_pool_child():
            lifespan.stop()

    def on_worker_shutdown(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is celery_app and not processes.children_run_tasks:
            lifespan.stop()

    class MainProcessLifespan(bootsteps.StartStopStep):  # type: ignore[misc]  # celery is untyped
        """Solo and threads pools run tasks in the main process: start-up before the consumer starts."""

        requires = ("celery.worker.components:Pool",)

        def start(self, worker: Any) -> None:
            if worker.app is celery_app and not processes.children_run_tasks:
                lifespan.start()  # raising here is Celery's "Unrecoverable error": exit code 1

        def stop(self, worker: Any) -> None:
            return None  # worker_shutdown ends it, once the pool has finished its tasks

    celery_app.steps["worker"].add(MainProcessLifespan)
    uid = id(celery_app)
    signals.worker_init.connect(on_worker_init, weak=False, dispatch_uid=f"celery-events-init-{uid}")
    signals.worker_process_init.connect(on_child_start, weak=False, dispatch_uid=f"celery-events-child-{uid}")
    signals.worker_process_shutdown.connect(on_child_end, weak=False, dispatch_uid=f"celery-events-child-end-{uid}")
    signals.worker_shutdown.connect(on_worker_shutdown, weak=False, dispatch_uid=f"celery-events-shutdown-{uid}")
    return lifespan
