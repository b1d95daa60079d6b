"""One state store for every host: workers and beats with data_dirs of their own, as on separate machines.

RabbitMQ carries the delays; the cancels and beat's tick claims live in ``state_url`` (PostgreSQL, or
a Redis that is not the broker). Before ``state_url`` they lived in SQLite under each ``data_dir``.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from litestar.testing import TestClient

from litestar_celery_events import cancel_scheduled, emit_later
from tests.apps.recording import create_app
from tests.helpers import CeleryProcess, celery_worker, runs_of, wait_for

pytestmark = pytest.mark.integration

_EMITTED = re.compile(r"beat: emitted 'heartbeat' tick (\S+) ")


@pytest.fixture(params=["postgresql", "redis"])
def state_url(request: pytest.FixtureRequest) -> str:
    if request.param == "redis":
        return str(request.getfixturevalue("redis_url"))
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{request.getfixturevalue('pg_database')}"


def _on_own_host(env: dict[str, str], tmp_path: Path, name: str) -> dict[str, str]:
    return {**env, "CELERY_EVENTS_DATA_DIR": str(tmp_path / name)}


def test_a_cancel_holds_on_every_worker_and_two_beats_fire_each_tick_once(
    state_url: str, amqp_url: str, tmp_path: Path, use_env: Callable[..., dict[str, str]]
) -> None:
    env = use_env(amqp_url, CELERY_EVENTS_STATE_URL=state_url, HEARTBEAT_EVERY_S="1")
    env["HEARTBEAT_EVERY_S"] = "1"
    records = Path(env["RECORD_FILE"])
    queue = os.environ["TEST_QUEUE"]
    app = create_app()
    with TestClient(app):
        # Cancelled while no worker runs: no revoke broadcast reaches the workers started later.
        cancelled = [emit_later(app, "reminder_due", note=f"cancelled {n}", delay=4) for n in range(3)]
        kept = [emit_later(app, "reminder_due", note=f"kept {n}", delay=4) for n in range(3)]
        assert all(cancel_scheduled(app, emission) for emission in cancelled)
    beats = []
    with (
        celery_worker(_on_own_host(env, tmp_path, "host-a"), tmp_path / "worker-a.log", queues=queue),
        celery_worker(_on_own_host(env, tmp_path, "host-b"), tmp_path / "worker-b.log", queues=queue),
    ):
        try:
            for name in ("beat-c", "beat-d"):
                beat = CeleryProcess(
                    ["beat", "--loglevel", "INFO"], _on_own_host(env, tmp_path, name), tmp_path / f"{name}.log"
                )
                beats.append(beat)
                beat.wait_ready(marker="beat: Starting...")
            wait_for(lambda: len(runs_of(records, "reminder_listener")) >= len(kept), timeout=20, what="kept events")

            def contended_ticks() -> bool:
                # The kept events can run before the second beat is up: wait for ticks both beats tried.
                fired = sum(len(_EMITTED.findall(beat.output())) for beat in beats)
                lost = sum(beat.output().count("was already fired by another beat") for beat in beats)
                return fired >= 3 and lost >= 1

            wait_for(contended_ticks, timeout=20, what="three ticks, one of them tried by both beats")
            time.sleep(1.0)  # a cancelled event would show by now
        finally:
            for beat in beats:
                beat.stop()
        ticks = [tick for beat in beats for tick in _EMITTED.findall(beat.output())]
        wait_for(lambda: len(runs_of(records, "heartbeat_listener")) >= len(ticks), timeout=10, what="heartbeats")
        time.sleep(0.5)

    notes = sorted(r["kwargs"]["note"] for r in runs_of(records, "reminder_listener"))
    assert notes == ["kept 0", "kept 1", "kept 2"]
    assert len(ticks) >= 3, ticks
    assert len(ticks) == len(set(ticks)), f"a tick fired on both beats: {sorted(ticks)}"
    contended = sum(beat.output().count("was already fired by another beat") for beat in beats)
    assert contended >= 1, "the two beats should both have tried the same ticks"
    assert len(runs_of(records, "heartbeat_listener")) == len(ticks)
    for log in ("worker-a.log", "worker-b.log", "beat-c.log", "beat-d.log"):
        assert "only this machine sees" not in (tmp_path / log).read_text()  # shared: no warning


def test_a_local_store_on_rabbitmq_warns_at_start_up_naming_state_url(
    amqp_url: str, tmp_path: Path, use_env: Callable[..., dict[str, str]]
) -> None:
    env = use_env(amqp_url)
    with celery_worker(env, tmp_path / "worker.log", queues=os.environ["TEST_QUEUE"]) as worker:
        wait_for(lambda: "only this machine sees" in worker.output(), timeout=5, what="the warning")
    assert "CeleryEventsConfig(state_url=...)" in worker.output()
    assert "guest:guest" not in worker.output()
