"""Delayed, cancellable and periodic events against real Redis and real worker and beat processes."""

from __future__ import annotations

import itertools
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import redis
from litestar.testing import TestClient

from litestar_celery_events import cancel_scheduled, emit_later
from litestar_celery_events.brokers import redis_settings_for_url
from litestar_celery_events.stores.schedule import RedisScheduleStore, redis_keys, stage_delayed
from tests.apps.recording import create_app
from tests.helpers import CeleryProcess, celery_worker, runs_of, wait_for

pytestmark = pytest.mark.integration

LATE_S = 2.0
"""How late a delayed event may start in these tests (the benchmark measures the real figure)."""


@pytest.fixture
def env(redis_url: str, use_env: Callable[..., dict[str, str]]) -> dict[str, str]:
    return use_env(redis_url)


@pytest.fixture
def store(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    zset, messages, _, ticks = redis_keys()
    client.delete(zset, messages, ticks)
    yield client
    client.close()


def test_delay_and_at_are_honoured_not_before_and_shortly_after(
    env: dict[str, str], tmp_path: Path, store: redis.Redis
) -> None:
    records = Path(env["RECORD_FILE"])
    app = create_app()
    with celery_worker(env, tmp_path / "worker.log", queues=os.environ["TEST_QUEUE"]) as worker, TestClient(app):
        now = time.time()
        due_delay = now + 1.5
        emit_later(app, "reminder_due", note="delay", delay=1.5)
        due_at = now + 2.5
        emit_later(app, "reminder_due", note="at", at=datetime.fromtimestamp(due_at, tz=timezone.utc))
        emit_later(app, "reminder_due", note="timedelta", delay=timedelta(seconds=2))
        wait_for(lambda: len(runs_of(records, "reminder_listener")) >= 3, timeout=10, what="the delayed events")
        assert "mover failed" not in worker.output()

    started = {r["kwargs"]["note"]: r["kwargs"]["at"] for r in runs_of(records, "reminder_listener")}
    for note, due in (("delay", due_delay), ("at", due_at), ("timedelta", now + 2.0)):
        assert due <= started[note] <= due + LATE_S, f"{note}: started {started[note] - due:+.3f}s after due"
    assert store.zcard(redis_keys()[0]) == 0


def test_racing_movers_enqueue_each_due_event_exactly_once(redis_url: str, store: redis.Redis) -> None:
    movers = [RedisScheduleStore(redis_settings_for_url(redis_url).open()) for _ in range(4)]
    assert movers[0].move_due(time.time()) == (0, None)  # an empty store
    queue = f"race-{os.environ['TEST_QUEUE']}"
    pipe = store.pipeline(transaction=False)
    now = time.time()
    for n in range(3000):
        stage_delayed(pipe, "", f"id-{n}", now - 1 if n < 2000 else now + 3600, queue, f'{{"n":{n}}}')
    pipe.execute()
    with ThreadPoolExecutor(len(movers)) as pool:
        list(pool.map(lambda mover: [mover.move_due(time.time(), 50) for _ in range(20)], movers))
    moved = [json.loads(m)["n"] for m in store.lrange(queue, 0, -1)]
    assert sorted(moved) == list(range(2000))
    assert movers[0].waiting() == 1000
    assert movers[0].move_due(time.time()) == (0, pytest.approx(now + 3600))
    store.delete(queue)


def test_events_status_shows_the_waiting_events_and_the_periodic_ones(
    env: dict[str, str], store: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    from litestar_celery_events.cli import status_of

    monkeypatch.setenv("HEARTBEAT_EVERY_S", "60")
    app = create_app()
    with TestClient(app):
        ids = [emit_later(app, "reminder_due", note=str(n), delay=60 + n) for n in range(2)]
        wait_for(lambda: store.zcard(redis_keys()[0]) == 2, what="the store to hold both")
        scheduling = status_of(app)["scheduling"]
        assert all(cancel_scheduled(app, emission_id) for emission_id in ids)
    assert scheduling["delayed_events_wait_in"] == "redis store"
    assert scheduling["delayed_events_waiting"] == 2
    assert scheduling["next_due"] is not None
    assert scheduling["periodic"] == [{"name": "heartbeat@every 60s", "event_id": "heartbeat", "last_tick": None}]


def test_a_cancelled_event_never_runs_even_across_a_worker_restart(
    env: dict[str, str], tmp_path: Path, store: redis.Redis
) -> None:
    records = Path(env["RECORD_FILE"])
    zset = redis_keys()[0]
    app = create_app()
    with TestClient(app):
        first = emit_later(app, "reminder_due", note="cancelled at once", delay=4)
        assert cancel_scheduled(app, first) is True  # before the publisher wrote it: the tombstone stops it
        second = emit_later(app, "reminder_due", note="cancelled from the store", delay=4)
        kept = emit_later(app, "reminder_due", note="kept", delay=4)
        wait_for(lambda: store.zscore(zset, second) is not None, what="the store to hold the event")
        with celery_worker(env, tmp_path / "worker-1.log", queues=os.environ["TEST_QUEUE"]):
            assert cancel_scheduled(app, second) is True
            assert cancel_scheduled(app, second) is False
        with celery_worker(env, tmp_path / "worker-2.log", queues=os.environ["TEST_QUEUE"]):
            wait_for(lambda: runs_of(records, "reminder_listener"), timeout=15, what="the kept event")
            time.sleep(0.5)
        assert cancel_scheduled(app, kept) is False  # already ran
        assert cancel_scheduled(app, "no-such-emission") is False

    assert [r["kwargs"]["note"] for r in runs_of(records, "reminder_listener")] == ["kept"]
    assert store.zcard(zset) == 0


def test_an_event_delayed_past_the_visibility_timeout_runs_exactly_once(
    env: dict[str, str], tmp_path: Path, store: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VISIBILITY_TIMEOUT_S", "1")
    env = {**env, "VISIBILITY_TIMEOUT_S": "1"}
    records = Path(env["RECORD_FILE"])
    app = create_app()
    with celery_worker(env, tmp_path / "worker.log", queues=os.environ["TEST_QUEUE"]), TestClient(app):
        emit_later(app, "reminder_due", note="once", delay=3)
        wait_for(lambda: runs_of(records, "reminder_listener"), timeout=10, what="the delayed event")
        time.sleep(3)  # past two more visibility timeouts: a redelivery would show up now
    assert len(runs_of(records, "reminder_listener")) == 1


_EMITTED = re.compile(r"beat: emitted 'heartbeat' tick (\S+) ")


def _beat(env: dict[str, str], log: Path) -> CeleryProcess:
    beat = CeleryProcess(["beat", "--loglevel", "INFO"], env, log)
    beat.wait_ready(marker="beat: Starting...")
    return beat


def _ticks(*beats: CeleryProcess) -> list[str]:
    return [tick for beat in beats for tick in _EMITTED.findall(beat.output())]


def test_two_beat_processes_fire_each_tick_once_and_a_restarted_beat_does_not_repeat_one(
    env: dict[str, str], tmp_path: Path, store: redis.Redis
) -> None:
    env = {**env, "HEARTBEAT_EVERY_S": "1"}
    records = Path(env["RECORD_FILE"])
    with celery_worker(env, tmp_path / "worker.log", queues=os.environ["TEST_QUEUE"]):
        first, second = _beat(env, tmp_path / "beat-1.log"), _beat(env, tmp_path / "beat-2.log")

        def contended() -> int:
            return sum(beat.output().count("was already fired by another beat") for beat in (first, second))

        try:  # until five ticks fired, four of them tried by both beats (a busy machine starts them late)
            wait_for(lambda: len(_ticks(first, second)) >= 5 and contended() >= 4, timeout=30, what="contended ticks")
        finally:
            first.stop()
            second.stop()
        together = _ticks(first, second)
        assert len(together) == len(set(together)), f"a tick fired twice: {sorted(together)}"
        assert len(together) >= 5, together
        assert contended() >= 4, "the two beats should both have tried most ticks"
        stamps = sorted(datetime.fromisoformat(t).timestamp() for t in together)
        assert all(b - a == 1 for a, b in itertools.pairwise(stamps)), f"a tick was skipped: {stamps}"

        restarted = _beat(env, tmp_path / "beat-3.log")
        try:
            wait_for(lambda: _ticks(restarted), timeout=5, what="the restarted beat to fire")
        finally:
            restarted.stop()
        assert min(_ticks(restarted)) > max(together), "the restarted beat fired an old tick again"
        fired = together + _ticks(restarted)
        wait_for(lambda: len(runs_of(records, "heartbeat_listener")) >= len(fired), timeout=10, what="heartbeats")
        time.sleep(0.5)
    assert len(runs_of(records, "heartbeat_listener")) == len(fired)


@pytest.mark.parametrize("broker", ["embedded", "amqp"])
def test_without_the_redis_store_celerys_eta_delays_and_the_cancel_set_holds(
    broker: str, request: pytest.FixtureRequest, tmp_path: Path, use_env: Callable[..., dict[str, str]]
) -> None:
    url = "filesystem://" if broker == "embedded" else str(request.getfixturevalue("amqp_url"))
    env = use_env(url)
    records = Path(env["RECORD_FILE"])
    app = create_app()
    # On RabbitMQ the worker gets a data_dir of its own, as on another host: Celery's revoke must do it.
    worker_env = env if broker == "embedded" else {**env, "CELERY_EVENTS_DATA_DIR": str(tmp_path / "worker-data")}
    with celery_worker(worker_env, tmp_path / "worker.log", queues=os.environ["TEST_QUEUE"]) as worker, TestClient(app):
        due = time.time() + 2
        dropped = emit_later(app, "reminder_due", note="cancelled", delay=2)
        emit_later(app, "reminder_due", note="kept", delay=2)
        assert cancel_scheduled(app, dropped) is True
        wait_for(lambda: runs_of(records, "reminder_listener"), timeout=15, what="the kept event")
        time.sleep(0.5)
        stopped_by = "Discarding revoked task" if broker == "amqp" else "was cancelled before it was due"
        assert stopped_by in worker.output()
    runs = runs_of(records, "reminder_listener")
    assert [r["kwargs"]["note"] for r in runs] == ["kept"]
    assert due <= runs[0]["kwargs"]["at"] <= due + LATE_S
