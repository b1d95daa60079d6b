"""Beat's side of scheduling: periodic events, each tick fired once.

- ``EventScheduler``: ``celery -A worker beat``'s scheduler. It emits each ``PeriodicEvent`` as an
  ordinary event and claims every tick in the store first (one atomic compare-and-set per
  schedule name), so two beat processes, or a restarted one, fire each tick once.
"""

from __future__ import annotations

import logging
import math
import time
from datetime import datetime, timedelta, timezone
from datetime import time as wall_time
from typing import TYPE_CHECKING, Any

from celery.beat import ScheduleEntry, Scheduler
from celery.schedules import crontab, schedstate
from celery.schedules import schedule as celery_schedule
from kombu.exceptions import OperationalError
from redis import ConnectionError as RedisConnectionError
from redis import TimeoutError as RedisTimeoutError

from litestar_celery_events.brokers import redact_url
from litestar_celery_events.contract.message import encode_body
from litestar_celery_events.contract.periodic import PeriodicEvent
from litestar_celery_events.runtime.mover import install_mover
from litestar_celery_events.stores.schedule import RedisScheduleStore
from litestar_celery_events.stores.state import check_state_store, schedule_store_for
from litestar_celery_events.transports import KombuTransport
from litestar_celery_events.transports.base import origin_nodename
from litestar_celery_events.transports.redis import redis_envelope

if TYPE_CHECKING:
    from celery import Celery

    from litestar_celery_events.contract.message import Emission
    from litestar_celery_events.emitter import CeleryEventEmitter
    from litestar_celery_events.stores.schedule import ScheduleStore

__all__ = ("AlignedInterval", "EventScheduler", "check_periodic_events", "install_scheduling")

logger = logging.getLogger("litestar_celery_events.scheduler")

DEFAULT_BEAT_SCHEDULER = "celery.beat.PersistentScheduler"

# The longest wait for a date that does come is 40 years (29 February on a given weekday, across
# 2100); a search longer than that which finds no day means the fields never match (Celery 5.4
# accepts a crontab on 30 February).
CRONTAB_SEARCH_DAYS = 366 * 41
TICK_RETRY_S = 1.0
"""How often beat retries a tick the broker could not take (a failover, an outage)."""
_BROKER_DOWN = (RedisConnectionError, RedisTimeoutError, OperationalError, OSError)


class AlignedInterval(celery_schedule):  # type: ignore[misc]  # celery is untyped here
    """An interval whose ticks fall on multiples of its length since the Unix epoch.

    Celery's own interval restarts from each run, so two beat processes (or one restarted) would
    tick at different instants; aligned ticks are the same everywhere, which is what lets the
    store deduplicate them.
    """

    def is_due(self, last_run_at: datetime) -> schedstate:
        seconds = self.seconds
        now = time.time()
        last = self.maybe_make_aware(last_run_at).timestamp()
        due = math.floor(now / seconds) > math.floor(last / seconds)
        return schedstate(is_due=due, next=seconds - (now % seconds))

    def slot(self) -> float:
        """The tick being fired: the latest multiple of the interval not after now."""
        seconds = float(self.seconds)
        return math.floor(time.time() / seconds) * seconds


def tick_slot(entry: ScheduleEntry) -> float:
    """The Unix time of the tick ``entry`` is due for (the same in every beat process)."""
    sched = entry.schedule
    if isinstance(sched, AlignedInterval):
        return sched.slot()
    return next_crontab_tick(sched, entry.last_run_at).timestamp()


def next_crontab_tick(sched: crontab, after: datetime) -> datetime:
    """The first minute after ``after`` that ``sched``'s fields match, read in its timezone.

    Computed from the fields rather than with ``crontab.remaining_delta``, whose answer depends on
    the Celery version: 5.4 matches the fields in ``after``'s own timezone, not the schedule's, and
    skips ticks when ``after`` is not today.
    """
    tz = sched.tz
    start = sched.maybe_make_aware(after).astimezone(tz).replace(tzinfo=None, second=0, microsecond=0)
    hours, minutes = sorted(sched.hour), sorted(sched.minute)
    day = start.date()
    for _ in range(CRONTAB_SEARCH_DAYS):
        weekday = day.isoweekday() % 7  # Celery counts Sunday as 0
        if day.month in sched.month_of_year and day.day in sched.day_of_month and weekday in sched.day_of_week:
            for hour in hours:
                for minute in minutes:
                    wall = datetime.combine(day, wall_time(hour, minute))
                    if wall > start:
                        return wall.replace(tzinfo=tz)
        day += timedelta(days=1)
    raise ValueError(f"{sched!r} matches no date: check its day_of_month and month_of_year")


def check_periodic_events(emitter: CeleryEventEmitter) -> None:
    """Fail at start-up, not at the first tick: each periodic event has listeners that accept its arguments."""
    for periodic in emitter.config.periodic:
        specs = emitter.registry.get(periodic.event_id)
        args, kwargs = periodic.args, dict(periodic.kwargs or {})
        emitter.registry.check_arguments(periodic.event_id, specs, args, kwargs)
        encode_body(periodic.event_id, args, kwargs, emitter.config.max_payload_bytes)


class EventScheduler(Scheduler):  # type: ignore[misc]  # celery is untyped here
    """Beat's scheduler: ``CeleryEventsConfig.periodic`` plus ``beat_schedule``, ticks claimed in the store.

    Nothing is kept in a local file: the last tick of each schedule lives in the store (Redis, or
    SQLite under ``data_dir``), so a restarted beat resumes where any beat left off, and a tick
    missed while no beat ran fires once, not once per missed tick.
    """

    emitter: CeleryEventEmitter

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.periodic: dict[str, PeriodicEvent] = {}
        self.pending: dict[str, tuple[float, Emission]] = {}
        """Per schedule, its latest tick the broker could not take, retried every ``TICK_RETRY_S``."""
        self._claimed: dict[str, float] = {}  # per schedule, the last tick this beat claimed (not on Redis)
        self.store: ScheduleStore = schedule_store_for(
            check_state_store(self.emitter.config, self.emitter.celery_app, "celery beat"), self.emitter.celery_app
        )
        self.fired = 0
        super().__init__(*args, **kwargs)

    @classmethod
    def bound_to(cls, emitter: CeleryEventEmitter) -> type[EventScheduler]:
        return type(cls.__name__, (cls,), {"emitter": emitter, "__module__": cls.__module__})

    def adjust(self, n: float | None, drift: float = 0.0) -> float | None:
        return n  # wake at the tick itself: Celery's default wakes 10 ms early and then spins

    def setup_schedule(self) -> None:
        if isinstance(self.store, RedisScheduleStore):
            self.store.check_single_server()  # beat stops here, naming the reason, on a Redis Cluster
            hazard = self.store.failover_hazard()
            if hazard:
                logger.warning("beat: %s", hazard)
        super().setup_schedule()
        tz = self.app.timezone
        for periodic in self.emitter.config.periodic:
            sched: Any = periodic.schedule
            if periodic.interval_s is not None:
                sched = AlignedInterval(periodic.interval_s, app=self.app)
            else:
                sched = crontab(**_crontab_fields(sched), app=self.app)
            last = self.store.last_tick(periodic.key)
            entry = ScheduleEntry(
                name=periodic.key,
                task=self.emitter.config.event_task_name(periodic.event_id),
                schedule=sched,
                args=periodic.args,
                kwargs=dict(periodic.kwargs or {}),
                last_run_at=None if last is None else datetime.fromtimestamp(last, tz=timezone.utc).astimezone(tz),
                app=self.app,
            )
            self.schedule[periodic.key] = entry
            self.periodic[periodic.key] = periodic
        if self.periodic:
            logger.info("beat: %d periodic event(s): %s", len(self.periodic), ", ".join(sorted(self.periodic)))

    @property
    def schedule(self) -> dict[str, ScheduleEntry]:
        return self.data  # type: ignore[no-any-return]

    def tick(self, *args: Any, **kwargs: Any) -> float:
        self._retry_pending()
        interval = float(super().tick(*args, **kwargs))
        return min(interval, TICK_RETRY_S) if self.pending else interval

    def _retry_pending(self) -> None:
        for name, (slot, emission) in list(self.pending.items()):
            self._apply(self.periodic[name], slot, emission)

    def apply_entry(self, entry: ScheduleEntry, producer: Any = None) -> None:
        periodic = self.periodic.get(entry.name)
        if periodic is None:
            super().apply_entry(entry, producer=producer)
            return
        slot = tick_slot(entry)
        tick = datetime.fromtimestamp(slot, tz=timezone.utc).isoformat()
        try:
            emission = self._prepare(periodic, tick)
        except Exception:
            logger.exception("beat: cannot emit periodic event %r for tick %s", periodic.key, tick)
            return
        self.pending.pop(periodic.key, None)  # a newer tick replaces one not yet fired: fired once, not once per miss
        self._apply(periodic, slot, emission)

    def _apply(self, periodic: PeriodicEvent, slot: float, emission: Emission) -> None:
        """Claim and fire one tick; a broker that cannot take it now (failing over) gets it again later.

        A retry is safe: the claim is a compare-and-set on the tick, so a tick whose reply was lost
        is found already fired."""
        tick = datetime.fromtimestamp(slot, tz=timezone.utc).isoformat()
        retry = periodic.key in self.pending
        try:
            fired = self._fire(periodic, slot, emission)
        except _BROKER_DOWN as exc:
            if not retry:
                logger.warning(
                    "beat: the broker cannot take tick %s of %r now (%s: %s); retrying every %.0f s",
                    tick, periodic.key, type(exc).__name__, redact_url(str(exc)), TICK_RETRY_S,
                )  # fmt: skip
            self.pending[periodic.key] = (slot, emission)
            return
        except Exception:
            self.pending.pop(periodic.key, None)
            logger.exception("beat: cannot emit periodic event %r for tick %s", periodic.key, tick)
            return
        self.pending.pop(periodic.key, None)
        if fired:
            self.fired += 1
            logger.info(
                "beat: emitted %r tick %s (emission %s)",
                periodic.event_id,
                tick,
                emission.emission_id,
                extra={"event_id": periodic.event_id, "emission_id": emission.emission_id, "tick": tick},
            )
        else:
            logger.info("beat: tick %s of %r was already fired by another beat", tick, periodic.key)

    def _prepare(self, periodic: PeriodicEvent, tick: str) -> Emission:
        emitter = self.emitter
        if not emitter.running:
            emitter.start()
        emission = emitter.prepare(periodic.event_id, periodic.args, dict(periodic.kwargs or {}))
        emission.extra_headers = {**(emission.extra_headers or {}), "periodic": periodic.key, "tick": tick}
        return emission

    def _fire(self, periodic: PeriodicEvent, slot: float, emission: Emission) -> bool:
        store = self.store
        route = self.emitter.publisher.route
        destination = route(emission)  # where send_task would put it: task_routes, priority, queues
        if isinstance(store, RedisScheduleStore) and destination.redis_key is not None:
            tag = f"{emission.emission_id}.1"
            envelope = redis_envelope(emission, destination.routing_key, origin_nodename(), tag, destination.priority)
            return store.fire_tick(periodic.key, slot, destination.redis_key, envelope)
        # No atomic claim-and-publish here: a beat dying between the two loses that one tick. A
        # publish that failed is retried (``pending``) without claiming the tick again.
        if self._claimed.get(periodic.key) != slot:
            if not store.claim_tick(periodic.key, slot):
                return False
            self._claimed[periodic.key] = slot
        transport_ = KombuTransport(self.app, route=route)
        try:
            transport_.publish([emission], [0])
        finally:
            transport_.close()
        return True


def _crontab_fields(sched: crontab) -> dict[str, Any]:
    return {
        "minute": sched._orig_minute,
        "hour": sched._orig_hour,
        "day_of_week": sched._orig_day_of_week,
        "day_of_month": sched._orig_day_of_month,
        "month_of_year": sched._orig_month_of_year,
    }


def install_scheduling(celery_app: Celery, emitter: CeleryEventEmitter) -> None:
    """Wire scheduling into ``celery -A worker worker|beat``: movers, beat's scheduler, start-up checks."""
    config = emitter.config
    check_periodic_events(emitter)
    current = celery_app.conf.beat_scheduler
    if isinstance(current, str) and current.replace(":", ".") != DEFAULT_BEAT_SCHEDULER:
        if config.periodic:  # e.g. a bring-your-own app on celery-redbeat: ours would be silently skipped
            raise ValueError(
                f"CeleryEventsConfig.periodic needs beat's EventScheduler, but the Celery app sets "
                f"beat_scheduler={current!r}; remove that setting or move the periodic events to it"
            )
    else:
        celery_app.conf.beat_scheduler = EventScheduler.bound_to(emitter)
    install_mover(celery_app, config)
