"""The worker side of delayed events: the mover (Redis) and the cancel check (other brokers).

- ``Mover``: a thread in every worker main process and in beat (Redis brokers) that enqueues due
  delayed events with one Lua script call; several movers never enqueue an event twice.
- ``cancelled_before_run``: on brokers without the store, the event task of a delayed emission
  asks the SQLite cancel set before running.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from celery import signals

from litestar_celery_events.brokers import redact_url, retry_delay_s, worth_logging
from litestar_celery_events.config import DEFAULT_DATA_DIR, CeleryEventsConfig
from litestar_celery_events.stores.schedule import RedisScheduleStore, SqliteScheduleStore, schedule_store_for

if TYPE_CHECKING:
    from celery import Celery, Task

    from litestar_celery_events.stores.schedule import ScheduleStore

__all__ = ("MOVE_BATCH", "Mover", "cancelled_before_run", "install_mover")

logger = logging.getLogger("litestar_celery_events.scheduler")

MOVE_BATCH = 1000


class Mover:
    """Moves due delayed events from the Redis store to their queues, in a daemon thread."""

    def __init__(self, store: RedisScheduleStore, poll_interval_s: float) -> None:
        self.store = store
        self.poll_interval_s = poll_interval_s
        self.moved = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self.running:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="celery-events-mover", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._thread = None
        self.store.close()

    def move_once(self) -> tuple[int, float | None]:
        moved, next_due = self.store.move_due(time.time(), MOVE_BATCH)
        self.moved += moved
        return moved, next_due

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                moved, next_due = self.move_once()
            except Exception as exc:  # noqa: BLE001 - broker away: keep trying, the store keeps the events
                failures += 1
                self.store.close()
                if worth_logging(failures):
                    logger.warning(
                        "delayed-event mover failed (%s: %s); retrying", type(exc).__name__, redact_url(str(exc))
                    )
                self._stop.wait(retry_delay_s(failures))
                continue
            if failures:
                logger.warning("delayed-event mover working again after %d failed attempt(s)", failures)
                failures = 0
            if moved >= MOVE_BATCH:
                continue
            wait = self.poll_interval_s
            if next_due is not None:
                wait = min(wait, max(0.0, next_due - time.time()))
            self._stop.wait(wait)


_stores: dict[int, ScheduleStore] = {}


def cancelled_before_run(task: Task) -> bool:
    """For the event task: True if this delayed emission (Celery ETA fallback) was cancelled."""
    request = task.request
    if request.eta is None:
        return False
    store = _stores.get(id(task.app))
    if store is None:
        data_dir = getattr(task.app, "celery_events_data_dir", None)
        store = _stores[id(task.app)] = schedule_store_for(task.app, data_dir or DEFAULT_DATA_DIR)
    if not isinstance(store, SqliteScheduleStore) or store.may_run(str(request.id)):
        return False
    logger.info("event %r emission %s was cancelled before it was due: not run", task.name, request.id)
    return True


def install_mover(celery_app: Celery, config: CeleryEventsConfig) -> Mover | None:
    """On Redis brokers: a mover in the worker's main process and in beat (started when they are ready)."""
    celery_app.celery_events_data_dir = config.resolved_data_dir
    store = schedule_store_for(celery_app, config.resolved_data_dir)
    if not isinstance(store, RedisScheduleStore):
        return None
    mover = Mover(store, config.delayed_poll_interval_s)
    celery_app.celery_events_mover = mover

    def start(**_: object) -> None:
        mover.start()

    def stop(**_: object) -> None:
        mover.stop()

    signals.worker_ready.connect(start, weak=False)  # the worker's main process only
    signals.beat_init.connect(start, weak=False)
    signals.worker_shutdown.connect(stop, weak=False)
    return mover
