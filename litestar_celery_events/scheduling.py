"""Delayed and periodic events: ``emit_later``, ``cancel_scheduled`` and ``PeriodicEvent``.

``emit_later`` validates exactly like ``emit`` and hands the emission to the same background
publisher (no network I/O on the caller's thread). On Redis the publisher writes it into a
broker-side store (a sorted set by due time, see ``stores.schedule``) and a mover enqueues it as an
ordinary Celery message when due; on RabbitMQ it waits in the broker's delay levels
(``transports.amqp_delay``); on the embedded broker it is sent with Celery's ``eta``.
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from litestar_celery_events.brokers import is_amqp_url, redact_url
from litestar_celery_events.contract.periodic import PeriodicEvent
from litestar_celery_events.emitter import emitter_of
from litestar_celery_events.stores.schedule import RedisScheduleStore, ScheduleStore, eta_of
from litestar_celery_events.stores.state import schedule_store_for, state_store_of
from litestar_celery_events.transports.amqp_delay import MAX_DELAY_S, DelayLevels, target_queue_problem

if TYPE_CHECKING:
    from litestar import Litestar

    from litestar_celery_events.emitter import CeleryEventEmitter

__all__ = (
    "PAST_TOLERANCE_S",
    "PeriodicEvent",
    "ScheduleError",
    "cancel_scheduled",
    "emit_later",
    "scheduling_status",
)

PAST_TOLERANCE_S = 1.0
"""A due time at most this far in the past is accepted (and runs at once): clocks and callers jitter."""
CLOCK_MARGIN_S = 1.0
"""Movers on other hosts may run this far ahead of this host's clock."""
MAX_REMEMBERED_IDS = 100_000
BROADCAST_SCHEMES = ("amqp://", "amqps://", "pyamqp://", "librabbitmq://")


class ScheduleError(ValueError):
    """``emit_later`` got no, two, or an unusable due time; nothing was enqueued."""


def _due_time(event_id: str, delay: float | timedelta | None, at: datetime | None, now: float) -> float:
    if (delay is None) == (at is None):
        raise ScheduleError(
            f"cannot schedule event {event_id!r}: give exactly one of delay= (seconds or timedelta) "
            "or at= (a timezone-aware datetime)"
        )
    if at is not None:
        if not isinstance(at, datetime):
            raise ScheduleError(f"cannot schedule event {event_id!r}: at= must be a datetime, got {type(at).__name__}")
        if at.tzinfo is None or at.utcoffset() is None:
            raise ScheduleError(
                f"cannot schedule event {event_id!r}: at={at.isoformat()} is naive; "
                "pass a timezone-aware datetime, e.g. datetime.now(timezone.utc) + timedelta(hours=1)"
            )
        due = at.timestamp()
    else:
        if isinstance(delay, timedelta):
            seconds = delay.total_seconds()
        elif isinstance(delay, (int, float)) and not isinstance(delay, bool):
            seconds = float(delay)
        else:
            raise ScheduleError(
                f"cannot schedule event {event_id!r}: delay= must be seconds or a timedelta, got {type(delay).__name__}"
            )
        if not math.isfinite(seconds):
            raise ScheduleError(f"cannot schedule event {event_id!r}: delay={seconds} is not finite")
        due = now + seconds
    if due < now - PAST_TOLERANCE_S:
        raise ScheduleError(
            f"cannot schedule event {event_id!r}: the due time is {now - due:.1f}s in the past "
            f"(tolerance {PAST_TOLERANCE_S}s); use emit() to run it now"
        )
    return due


class _Scheduled:
    """Per emitter: the store, and the ids this process scheduled (so cancel is right before they are written)."""

    def __init__(self, emitter: CeleryEventEmitter) -> None:
        self._emitter = weakref.ref(emitter)  # a value of a WeakKeyDictionary keyed by the emitter
        self._store: ScheduleStore | None = None
        self.due_by_id: dict[str, float] = {}
        self.lock = threading.Lock()

    @property
    def store(self) -> ScheduleStore:
        """Made at the first cancel: ``emit_later`` itself never touches it (the SQLite one creates a file)."""
        if self._store is None:
            emitter = self._emitter()
            if emitter is None:
                raise RuntimeError("the event emitter is gone")
            self._store = schedule_store_for(state_store_of(emitter.config, emitter.celery_app), emitter.celery_app)
        return self._store

    def remember(self, emission_id: str, due: float) -> None:
        with self.lock:
            if len(self.due_by_id) >= MAX_REMEMBERED_IDS:  # one rebuild per MAX/10 calls
                now = time.time()
                kept = [(k, d) for k, d in self.due_by_id.items() if d >= now]
                # Drop the oldest tenth if still full: the publisher wrote those long ago.
                self.due_by_id = dict(kept[-int(MAX_REMEMBERED_IDS * 0.9) :])
            self.due_by_id[emission_id] = due

    def due_of(self, emission_id: str) -> float | None:
        """The due time of ``emission_id`` if this process scheduled it."""
        with self.lock:
            return self.due_by_id.get(emission_id)

    def forget_if_not_due(self, emission_id: str) -> bool:
        """Forget ``emission_id``; True if this process scheduled it and it is not due yet (so no
        mover can have moved it: it is in the store, or the tombstone stops the publisher's write)."""
        with self.lock:
            due = self.due_by_id.pop(emission_id, None)
        return due is not None and due > time.time() + CLOCK_MARGIN_S


_scheduled: weakref.WeakKeyDictionary[CeleryEventEmitter, _Scheduled] = weakref.WeakKeyDictionary()
_scheduled_lock = threading.Lock()


def _scheduled_of(emitter: CeleryEventEmitter) -> _Scheduled:
    state = _scheduled.get(emitter)
    if state is None:
        with _scheduled_lock:
            state = _scheduled.get(emitter)
            if state is None:
                state = _scheduled[emitter] = _Scheduled(emitter)
    return state


def scheduling_status(emitter: CeleryEventEmitter, timeout_s: float) -> dict[str, Any]:
    """For ``events status``: where delayed events wait (and how many), and each periodic event's last tick."""
    state = state_store_of(emitter.config, emitter.celery_app)
    store = schedule_store_for(state, emitter.celery_app, timeout_s)
    status: dict[str, Any] = {
        "state_store": state.location,
        "delayed_events_wait_in": _where_delayed_events_wait(emitter, store),
        "periodic": [{"name": p.key, "event_id": p.event_id} for p in emitter.config.periodic],
    }
    try:
        if isinstance(store, RedisScheduleStore):
            status["delayed_events_waiting"] = store.waiting()
            next_due = store.next_due()
            status["next_due"] = None if next_due is None else eta_of(next_due)
        elif is_amqp_url(emitter.celery_app.conf.broker_url):
            # Every app's with the same prefix: the levels are shared, and hold no per-app count.
            status["delayed_events_waiting"] = _waiting_in_delay_levels(emitter, timeout_s)
        for entry in status["periodic"]:
            last = store.last_tick(entry["name"])
            entry["last_tick"] = None if last is None else eta_of(last)
    except Exception as exc:  # noqa: BLE001 - status must print even when the store is unreachable
        status["error"] = f"unavailable ({redact_url(str(exc))})"
    finally:
        store.close()
    return status


def _waiting_in_delay_levels(emitter: CeleryEventEmitter, timeout_s: float) -> int:
    celery_app = emitter.celery_app
    with celery_app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=timeout_s)
        return DelayLevels.of(celery_app).waiting(connection.default_channel)


def _where_delayed_events_wait(emitter: CeleryEventEmitter, store: ScheduleStore) -> str:
    if isinstance(store, RedisScheduleStore):
        return "redis store"
    if is_amqp_url(emitter.celery_app.conf.broker_url):
        return f"rabbitmq delay queues ({DelayLevels.of(emitter.celery_app).prefix}_celery_delayed_0..27)"
    return "workers (Celery eta)"


def _check_broker_can_delay(emitter: CeleryEventEmitter, event_id: str, queue: str | None, delay_s: float) -> None:
    """RabbitMQ: the delay levels hold up to MAX_DELAY_S, for a queue a topic binding can name."""
    celery_app = emitter.celery_app
    if not is_amqp_url(celery_app.conf.broker_url):
        return
    if delay_s > MAX_DELAY_S:
        raise ScheduleError(
            f"cannot schedule event {event_id!r}: {delay_s:.0f}s ahead is beyond the {MAX_DELAY_S}s (about 8.5 "
            "years) RabbitMQ's delay levels hold; schedule it nearer and re-schedule from its listener"
        )
    problem = target_queue_problem(queue or celery_app.conf.task_default_queue)
    if problem:
        raise ScheduleError(f"cannot schedule event {event_id!r} on RabbitMQ: {problem}")


def emit_later(
    app: Litestar,
    event_id: str,
    *args: Any,
    delay: float | timedelta | None = None,
    at: datetime | None = None,
    **kwargs: Any,
) -> str:
    """Emit ``event_id`` after ``delay`` (seconds or ``timedelta``) or ``at`` (an aware ``datetime``).

    Returns the emission id (for ``cancel_scheduled``). Raises what ``emit`` raises, plus
    ``ScheduleError`` for a missing, doubled, naive or past due time (on RabbitMQ also one beyond
    ``MAX_DELAY_S``, about 8.5 years); nothing is enqueued then. On RabbitMQ a delay is rounded up
    to whole seconds: the event runs at, or up to a second after, its due time.
    No network I/O here: the publisher thread writes it (so ``delay`` and ``at`` cannot be
    listener argument names).
    """
    emitter = emitter_of(app)
    now = time.time()
    due = _due_time(event_id, delay, at, now)
    emission = emitter.prepare(event_id, args, kwargs)
    _check_broker_can_delay(emitter, event_id, emission.queue, due - now)
    emission.eta = eta_of(due)
    state = _scheduled_of(emitter)
    state.remember(emission.emission_id, due)
    return emitter.submit(emission)


def cancel_scheduled(app: Litestar, emission_id: str) -> bool:
    """Make sure a scheduled emission never runs. True if it had not been dispatched; False if it
    already was (or never existed). Durable: a restart of any worker or beat does not undo it.

    One round trip to the store on the caller's thread (it has to answer): from an async handler
    on a broker that may be slow, call it through ``anyio.to_thread.run_sync``.
    """
    emitter = emitter_of(app)
    state = _scheduled_of(emitter)
    removed = state.store.cancel(emission_id, state.due_of(emission_id))
    not_due_here = state.forget_if_not_due(emission_id)
    if isinstance(state.store, RedisScheduleStore):
        # The publisher may not have written it yet: the tombstone the cancel left stops that write.
        return removed or not_due_here
    if removed and str(emitter.celery_app.conf.broker_url).startswith(BROADCAST_SCHEMES):
        # Workers on other hosts do not see this data_dir: Celery's revoke reaches them (kept in
        # their memory, or in the file of ``celery worker --statedb``).
        emitter.celery_app.control.revoke(emission_id)
    return removed
