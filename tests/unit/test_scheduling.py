"""Scheduling without a worker: due-time checks, PeriodicEvent, aligned ticks, the SQLite fallback store."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from celery.schedules import crontab
from litestar import Litestar
from litestar.exceptions import ImproperlyConfiguredException

from litestar_celery_events import (
    CeleryEventEmitter,
    CeleryEventsConfig,
    CeleryEventsPlugin,
    EventPayloadError,
    PeriodicEvent,
    ScheduleError,
    cancel_scheduled,
    emit_later,
    listener,
)
from litestar_celery_events.runtime.beat import AlignedInterval, check_periodic_events, tick_slot
from litestar_celery_events.stores.schedule import SqliteScheduleStore, due_timestamp, eta_of


@listener("reminder")
def remind(note: str) -> None: ...


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Litestar]:
    """A running app on the embedded broker (nothing here reaches a worker)."""
    app = Litestar(listeners=[remind], plugins=[CeleryEventsPlugin(CeleryEventsConfig(data_dir=str(tmp_path)))])
    emitter = app.event_emitter
    assert isinstance(emitter, CeleryEventEmitter)
    emitter.start()
    yield app
    emitter.stop()


def _published(app: Litestar) -> int:
    emitter = app.event_emitter
    assert isinstance(emitter, CeleryEventEmitter)
    return emitter.publisher.pending + emitter.publisher.published


@pytest.mark.parametrize(
    ("when", "message"),
    [
        ({}, "exactly one of delay= .* or at="),
        ({"delay": 5, "at": datetime.now(timezone.utc)}, "exactly one of delay="),
        ({"at": datetime(2030, 1, 1, 12, 0)}, "is naive; pass a timezone-aware datetime"),
        ({"at": datetime.now(timezone.utc) - timedelta(minutes=1)}, r"\d+\.\ds in the past"),
        ({"delay": -30}, "in the past"),
        ({"delay": "10"}, "delay= must be seconds or a timedelta, got str"),
        ({"delay": True}, "got bool"),
        ({"delay": float("inf")}, "not finite"),
        ({"at": "2030-01-01T00:00:00Z"}, "at= must be a datetime"),
    ],
    ids=["neither", "both", "naive", "past", "negative", "string", "bool", "infinite", "iso-string"],
)
def test_a_bad_due_time_raises_a_schedule_error_and_enqueues_nothing(
    app: Litestar, when: dict[str, Any], message: str
) -> None:
    with pytest.raises(ScheduleError, match=message) as excinfo:
        emit_later(app, "reminder", note="x", **when)
    assert "'reminder'" in str(excinfo.value)
    assert isinstance(excinfo.value, ValueError)
    assert _published(app) == 0


def test_emit_later_raises_what_emit_raises_and_enqueues_nothing(app: Litestar) -> None:
    with pytest.raises(ImproperlyConfiguredException):
        emit_later(app, "nobody_listens", delay=1)
    with pytest.raises(EventPayloadError, match="'reminder'"):
        emit_later(app, "reminder", note=object(), delay=1)
    with pytest.raises(TypeError, match="remind"):
        emit_later(app, "reminder", wrong="x", delay=1)
    assert _published(app) == 0


def test_a_small_jitter_into_the_past_is_accepted(app: Litestar) -> None:
    emission_id = emit_later(app, "reminder", note="now", at=datetime.now(timezone.utc) - timedelta(seconds=0.5))
    assert isinstance(emission_id, str)
    assert _published(app) == 1


def test_emit_later_sets_celerys_eta_for_brokers_without_a_store(app: Litestar) -> None:
    emitter = app.event_emitter
    assert isinstance(emitter, CeleryEventEmitter)
    emitter.publisher.stop()  # keep the emission in the buffer to look at it
    emitter.publisher._buffer.clear()
    due = datetime.now(timezone.utc) + timedelta(hours=1)
    emit_later(app, "reminder", note="later", at=due)
    emission = emitter.publisher._buffer[0]
    assert emission.eta is not None
    assert abs(due_timestamp(emission.eta) - due.timestamp()) < 1e-3


def test_cancel_on_the_fallback_store_sticks_and_a_run_excludes_a_later_cancel(app: Litestar, tmp_path: Path) -> None:
    cancelled = emit_later(app, "reminder", note="a", delay=60)
    assert cancel_scheduled(app, cancelled) is True
    store = SqliteScheduleStore(tmp_path / "scheduling.sqlite3")
    assert store.may_run(cancelled) is False
    ran = emit_later(app, "reminder", note="b", delay=60)
    assert store.may_run(ran) is True
    assert cancel_scheduled(app, ran) is False


def test_sqlite_ticks_are_claimed_once_and_only_forwards(tmp_path: Path) -> None:
    store = SqliteScheduleStore(tmp_path / "s.sqlite3")
    assert store.last_tick("hb") is None
    assert store.claim_tick("hb", 100.0) is True
    assert store.claim_tick("hb", 100.0) is False
    assert store.claim_tick("hb", 99.0) is False
    assert store.claim_tick("hb", 101.0) is True
    assert SqliteScheduleStore(tmp_path / "s.sqlite3").last_tick("hb") == 101.0


def test_periodic_events_normalise_their_schedule_and_name() -> None:
    assert PeriodicEvent("hb", 5).interval_s == 5.0
    assert PeriodicEvent("hb", timedelta(minutes=1)).name == "hb@every 60s"
    daily = PeriodicEvent("report", crontab(hour=7, minute=0), kwargs={"kind": "daily"})
    assert daily.interval_s is None
    assert daily.name == "report@0 7 * * *"
    assert daily.kwargs == {"kind": "daily"}
    assert PeriodicEvent("hb", 5, name="mine").key == "mine"


@pytest.mark.parametrize(
    ("schedule", "error"),
    [(0, ValueError), (-1, ValueError), ("5", TypeError), (True, TypeError)],
    ids=["zero", "negative", "string", "bool"],
)
def test_a_bad_periodic_schedule_fails_at_configuration(schedule: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="'hb'"):
        PeriodicEvent("hb", schedule)


def test_two_periodic_events_with_one_name_are_refused() -> None:
    with pytest.raises(ValueError, match="distinct names"):
        CeleryEventsConfig(periodic=[PeriodicEvent("hb", 5), PeriodicEvent("hb", 5)])
    CeleryEventsConfig(periodic=[PeriodicEvent("hb", 5), PeriodicEvent("hb", 5, name="other")])


def test_a_periodic_event_without_listeners_or_with_bad_arguments_fails_at_start_up(tmp_path: Path) -> None:
    for periodic, error in [
        (PeriodicEvent("nobody_listens", 5), ImproperlyConfiguredException),
        (PeriodicEvent("reminder", 5, kwargs={"wrong": 1}), TypeError),
    ]:
        config = CeleryEventsConfig(data_dir=str(tmp_path), periodic=[periodic])
        app = Litestar(listeners=[remind], plugins=[CeleryEventsPlugin(config)])
        assert isinstance(app.event_emitter, CeleryEventEmitter)
        with pytest.raises(error):
            check_periodic_events(app.event_emitter)


def test_aligned_intervals_tick_on_multiples_of_their_length(monkeypatch: pytest.MonkeyPatch) -> None:
    sched = AlignedInterval(10.0)
    monkeypatch.setattr("time.time", lambda: 1_000_005.0)
    last = datetime.fromtimestamp(999_999.0, tz=timezone.utc)
    state = sched.is_due(last)
    assert state.is_due and state.next == 5.0
    assert sched.slot() == 1_000_000.0
    assert not sched.is_due(datetime.fromtimestamp(1_000_000.5, tz=timezone.utc)).is_due


def test_a_crontab_tick_is_its_scheduled_minute_whatever_the_last_run(tmp_path: Path) -> None:
    from celery import Celery
    from celery.beat import ScheduleEntry

    app = Celery(set_as_current=False)
    app.conf.timezone = "Europe/Paris"
    every_5 = crontab(minute="*/5", app=app)
    for seconds in (0.2, 3.9, 61.0):
        last = datetime(2030, 1, 1, 7, 0, tzinfo=timezone.utc) + timedelta(seconds=seconds)
        entry = ScheduleEntry(name="x", task="t", schedule=every_5, last_run_at=last, app=app)
        assert tick_slot(entry) == datetime(2030, 1, 1, 7, 5, tzinfo=timezone.utc).timestamp()


def test_eta_round_trips_through_celerys_iso_format() -> None:
    assert due_timestamp(eta_of(1_700_000_000.25)) == 1_700_000_000.25
    assert eta_of(0).endswith("+00:00")


def test_scheduling_needs_the_plugin(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="no CeleryEventsPlugin"):
        emit_later(Litestar(), "reminder", delay=1)


def test_periodic_events_refuse_a_celery_app_with_another_beat_scheduler(tmp_path: Path) -> None:
    from celery import Celery

    from litestar_celery_events.runtime.beat import EventScheduler, install_scheduling

    own = Celery(set_as_current=False)
    own.conf.beat_scheduler = "redbeat:RedBeatScheduler"
    config = CeleryEventsConfig(
        data_dir=str(tmp_path), celery_app=own, periodic=[PeriodicEvent("reminder", 60, kwargs={"note": "x"})]
    )
    app = Litestar(listeners=[remind], plugins=[CeleryEventsPlugin(config)])
    emitter = app.event_emitter
    assert isinstance(emitter, CeleryEventEmitter)
    with pytest.raises(ValueError, match="redbeat:RedBeatScheduler"):
        install_scheduling(emitter.celery_app, emitter)

    default = Litestar(listeners=[remind], plugins=[CeleryEventsPlugin(CeleryEventsConfig(data_dir=str(tmp_path)))])
    assert isinstance(default.event_emitter, CeleryEventEmitter)
    install_scheduling(default.event_emitter.celery_app, default.event_emitter)
    assert issubclass(default.event_emitter.celery_app.conf.beat_scheduler, EventScheduler)


def test_beat_reads_crontabs_in_the_configured_timezone_and_resumes_from_the_last_claimed_tick(
    tmp_path: Path,
) -> None:
    from litestar_celery_events.runtime.beat import install_scheduling

    daily = PeriodicEvent("reminder", crontab(hour=7, minute=0), kwargs={"note": "good morning"})
    config = CeleryEventsConfig(data_dir=str(tmp_path), timezone="Asia/Tokyo", periodic=[daily])
    app = Litestar(listeners=[remind], plugins=[CeleryEventsPlugin(config)])
    emitter = app.event_emitter
    assert isinstance(emitter, CeleryEventEmitter)
    install_scheduling(emitter.celery_app, emitter)
    last = datetime(2030, 1, 1, 0, 0, tzinfo=timezone.utc).timestamp()  # 09:00 in Tokyo
    SqliteScheduleStore(tmp_path / "scheduling.sqlite3").claim_tick(daily.key, last)

    scheduler = emitter.celery_app.conf.beat_scheduler(app=emitter.celery_app)
    entry = scheduler.schedule[daily.key]
    assert entry.last_run_at.timestamp() == last
    assert tick_slot(entry) == datetime(2030, 1, 1, 22, 0, tzinfo=timezone.utc).timestamp()  # 07:00 the next day


def test_two_beats_on_the_embedded_broker_fire_a_tick_once(tmp_path: Path) -> None:
    from kombu.transport import filesystem

    from litestar_celery_events.runtime.beat import install_scheduling

    # kombu keeps the filesystem broker's bindings per process: an earlier test's data_dir would
    # make it skip binding the queue in this one (a process only ever has one data_dir otherwise).
    filesystem.Transport.global_state.clear()
    every_minute = PeriodicEvent("reminder", 60, kwargs={"note": "tick"})
    beats = []
    for _ in range(2):
        config = CeleryEventsConfig(data_dir=str(tmp_path), periodic=[every_minute])
        app = Litestar(listeners=[remind], plugins=[CeleryEventsPlugin(config)])
        emitter = app.event_emitter
        assert isinstance(emitter, CeleryEventEmitter)
        install_scheduling(emitter.celery_app, emitter)
        beats.append((emitter, emitter.celery_app.conf.beat_scheduler(app=emitter.celery_app)))
    try:
        for _, scheduler in beats:
            scheduler.apply_entry(scheduler.schedule[every_minute.key])
        assert sum(scheduler.fired for _, scheduler in beats) == 1
        messages = [p for p in (tmp_path / "broker").glob("*.msg") if every_minute.key in p.read_text()]
        assert len(messages) == 1
    finally:
        for emitter, _ in beats:
            emitter.stop()


def test_a_tick_the_broker_cannot_take_now_is_retried_and_fires_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kombu.exceptions import OperationalError
    from kombu.transport import filesystem

    from litestar_celery_events.runtime.beat import install_scheduling
    from litestar_celery_events.transports import KombuTransport

    filesystem.Transport.global_state.clear()
    every_minute = PeriodicEvent("reminder", 60, kwargs={"note": "tick"})
    config = CeleryEventsConfig(data_dir=str(tmp_path), periodic=[every_minute])
    app = Litestar(listeners=[remind], plugins=[CeleryEventsPlugin(config)])
    emitter = app.event_emitter
    assert isinstance(emitter, CeleryEventEmitter)
    install_scheduling(emitter.celery_app, emitter)
    scheduler = emitter.celery_app.conf.beat_scheduler(app=emitter.celery_app)
    publish = KombuTransport.publish

    def broker_away(*_: Any, **__: Any) -> None:
        raise OperationalError("NOREPLICAS Not enough good replicas to write.")

    try:
        monkeypatch.setattr(KombuTransport, "publish", broker_away)
        scheduler.apply_entry(scheduler.schedule[every_minute.key])
        scheduler.tick()  # still away: kept for the next try
        assert (scheduler.fired, list(scheduler.pending)) == (0, [every_minute.key])
        monkeypatch.setattr(KombuTransport, "publish", publish)
        scheduler.tick()
        scheduler.tick()
        assert (scheduler.fired, scheduler.pending) == (1, {})
        messages = [p for p in (tmp_path / "broker").glob("*.msg") if every_minute.key in p.read_text()]
        assert len(messages) == 1, "claimed once, published once"
    finally:
        emitter.stop()
