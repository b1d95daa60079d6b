"""The worker side of delayed events: the mover (Redis), the delay levels (RabbitMQ), the cancel check.

- ``Mover``: a thread in every worker main process and in beat (Redis brokers) that enqueues due
  delayed events with one Lua script call; several movers never enqueue an event twice.
- ``DeclareDelayLevels``: a consumer bootstep (RabbitMQ) that declares the delay levels and binds
  the worker's queues to them at every consumer start, after Celery declared those queues.
- ``cancelled_before_run``: on brokers without the store, the event task of a delayed emission
  asks the cancel set before running.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, cast

import redis
from celery import bootsteps, signals
from kombu.common import Broadcast

from litestar_celery_events.brokers import is_amqp_url, redact_url, retry_delay_s, worth_logging
from litestar_celery_events.config import CeleryEventsConfig
from litestar_celery_events.contract.message import DUE_AT_HEADER
from litestar_celery_events.stores.schedule import ArrivalCheckedStore, RedisScheduleStore
from litestar_celery_events.stores.state import schedule_store_for, state_store_of
from litestar_celery_events.transports.amqp_delay import DelayLevels

if TYPE_CHECKING:
    from celery import Celery, Task
    from celery.worker import WorkController
    from celery.worker.consumer import Consumer

    from litestar_celery_events.stores.schedule import ScheduleStore

__all__ = ("MOVE_BATCH", "CheckDelayedStore", "DeclareDelayLevels", "Mover", "cancelled_before_run", "install_mover")

logger = logging.getLogger("litestar_celery_events.scheduler")

MOVE_BATCH = 1000
DEAD_LETTER_HEADERS = (
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
)
"""What RabbitMQ adds at each delay level; copied into a republished message (Celery < 5.5 retries),
it makes RabbitMQ see a dead-letter cycle and drop the message at the first level it meets again."""


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


class DeclareDelayLevels(bootsteps.StartStopStep):  # type: ignore[misc]  # celery is untyped here
    """RabbitMQ: the delay levels and the bindings of this worker's queues, at every consumer start.

    Idempotent (the same declarations each time); a level that exists with other arguments stops
    the worker at start-up with ``DelayTopologyError`` naming the setting to change.
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)  # Celery has declared the queues by then

    def start(self, c: Consumer) -> None:
        levels = DelayLevels.of(c.app)
        queues = [q for q in c.app.amqp.queues.consume_from.values() if not isinstance(q, Broadcast)]
        with c.app.connection_for_write() as connection:
            channel = connection.default_channel
            levels.declare(channel)
            for queue in queues:
                levels.bind(channel, queue.name)
        logger.info(
            "delayed events wait in RabbitMQ's delay levels %s_celery_delayed_0..27 (%s queues); bound: %s",
            levels.prefix,
            levels.queue_type,
            ", ".join(q.name for q in queues),
        )


class CheckDelayedStore(bootsteps.StartStopStep):  # type: ignore[misc]  # celery is untyped here
    """Redis: refuse a Redis Cluster at start-up, naming the reason (a worker step: it runs before the
    consumer, whose first queue declaration would otherwise fail with kombu's CROSSSLOT error), and
    warn when a Sentinel master runs without ``min-replicas-to-write`` (a failover would discard writes)."""

    def start(self, w: WorkController) -> None:
        mover = getattr(w.app, "celery_events_mover", None)
        if mover is None:
            return
        try:
            mover.store.check_single_server()
            hazard = mover.store.failover_hazard()
        except (redis.ConnectionError, redis.TimeoutError) as exc:  # the broker is not up yet: Celery waits for it
            logger.warning("cannot check that the broker's Redis is not a cluster now (%s)", redact_url(str(exc)))
            return
        if hazard:
            logger.warning(hazard)


_stores: dict[int, ScheduleStore] = {}


def forget_dead_letter_headers(task: Task) -> None:
    """Drop RabbitMQ's ``x-death`` headers from a delayed emission's request, so nothing copies them on."""
    request = task.request
    for name in DEAD_LETTER_HEADERS:
        request.__dict__.pop(name, None)
    if isinstance(request.headers, dict):
        for name in DEAD_LETTER_HEADERS:
            request.headers.pop(name, None)


def cancelled_before_run(task: Task) -> bool:
    """For the event task: True if this delayed emission (RabbitMQ's delay levels or Celery's ETA) was cancelled.

    The one place that asks the cancel set (in the state store, ``state_url``).
    """
    request = task.request
    if request.eta is None and request.get(DUE_AT_HEADER) is None:
        return False
    store = _stores.get(id(task.app))
    if store is None:
        state = getattr(task.app, "celery_events_state", None)
        if state is None:  # an app install_mover never saw: the defaults' store
            state = state_store_of(CeleryEventsConfig(), task.app)
        store = _stores[id(task.app)] = schedule_store_for(state, task.app)
    if isinstance(store, RedisScheduleStore):
        # Redis brokers: only a delayed event whose route only kombu can deliver (an exchange that
        # fans out) carries Celery's eta; cancel_scheduled left its tombstone in the store.
        if not store.was_cancelled(str(request.id)):
            return False
    elif cast("ArrivalCheckedStore", store).may_run(str(request.id)):
        return False
    logger.info("event %r emission %s was cancelled before it was due: not run", task.name, request.id)
    return True


def install_mover(celery_app: Celery, config: CeleryEventsConfig) -> Mover | None:
    """On Redis brokers: a mover in the worker's main process and in beat (started when they are ready).
    On RabbitMQ: the delay levels, declared by each worker's consumer."""
    celery_app.celery_events_state = state = state_store_of(config, celery_app)
    if is_amqp_url(celery_app.conf.broker_url):
        DelayLevels.of(celery_app)  # a bad setting fails here, when the worker or beat loads the app
        celery_app.steps["consumer"].add(DeclareDelayLevels)
    store = schedule_store_for(state, celery_app)
    if not isinstance(store, RedisScheduleStore):
        return None
    mover = Mover(store, config.delayed_poll_interval_s)
    celery_app.celery_events_mover = mover
    celery_app.steps["worker"].add(CheckDelayedStore)  # beat checks in EventScheduler.setup_schedule

    def start(**_: object) -> None:
        mover.start()

    def stop(**_: object) -> None:
        mover.stop()

    signals.worker_ready.connect(start, weak=False)  # the worker's main process only
    signals.beat_init.connect(start, weak=False)
    signals.worker_shutdown.connect(stop, weak=False)
    return mover
