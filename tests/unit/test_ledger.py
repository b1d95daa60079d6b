"""Runs once: the ledger of completed (emission, listener) pairs in Redis and SQL, and the worker's tasks
skipping a listener that completed when the same emission comes again (eager task runs, no broker)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from litestar import Litestar
from litestar.events import listener
from sqlalchemy import MetaData, create_engine

from litestar_celery_events import CeleryEventEmitter, CeleryEventsConfig, CeleryEventsPlugin
from litestar_celery_events.brokers import redis_settings_for_url
from litestar_celery_events.runtime.ledger import RunOnce
from litestar_celery_events.runtime.tasks import register_event_tasks
from litestar_celery_events.stores.ledger import RedisListenerLedger, SqlListenerLedger, ledger_table

calls: list[str] = []


@listener("user_created")
def welcome(email: str) -> None:
    calls.append(f"welcome:{email}")


@listener("user_created")
def flaky(email: str) -> None:
    calls.append(f"flaky:{email}")
    if email == "fails@example.com":
        raise ValueError("mail server down")


class MemoryLedger:
    location = "memory"

    def __init__(self) -> None:
        self.done: dict[str, set[str]] = {}
        self.down = False

    def completed(self, emission_id: str) -> set[str]:
        if self.down:
            raise ConnectionError("ledger down")
        return set(self.done.get(emission_id, ()))

    def record(self, emission_id: str, listener: str) -> None:
        if self.down:
            raise ConnectionError("ledger down")
        self.done.setdefault(emission_id, set()).add(listener)

    def close(self) -> None:
        pass


def _tasks(tmp_path: Path, ledger: MemoryLedger) -> tuple[Any, dict[str, str]]:
    config = CeleryEventsConfig(data_dir=str(tmp_path))
    app = Litestar(listeners=[welcome, flaky], plugins=[CeleryEventsPlugin(config)], logging_config=None)
    emitter = app.event_emitter
    assert isinstance(emitter, CeleryEventEmitter)
    celery_app = emitter.celery_app
    register_event_tasks(celery_app, emitter.registry, emitter.config, None, RunOnce(ledger))
    names = {s.fn.__name__: s.name for s in emitter.registry.by_event["user_created"]}
    return celery_app, names


def test_a_duplicate_emission_does_not_rerun_listeners_that_completed(tmp_path: Path) -> None:
    calls.clear()
    ledger = MemoryLedger()
    celery_app, names = _tasks(tmp_path, ledger)
    event_task = celery_app.tasks["events.user_created"]
    event_task.apply((), {"email": "a@example.com"}, task_id="emission-1")
    event_task.apply((), {"email": "a@example.com"}, task_id="emission-1")  # the relay's copy, a redelivery
    event_task.apply((), {"email": "a@example.com"}, task_id="emission-2")  # another emission runs
    assert sorted(calls) == sorted(["welcome:a@example.com", "flaky:a@example.com"] * 2)
    assert ledger.done == {"emission-1": set(names.values()), "emission-2": set(names.values())}


def test_a_listener_that_failed_is_not_recorded_and_runs_again_alone(tmp_path: Path) -> None:
    calls.clear()
    ledger = MemoryLedger()
    celery_app, names = _tasks(tmp_path, ledger)
    flaky_task = celery_app.tasks[f"events.user_created[{names['flaky']}]"]
    welcome_task = celery_app.tasks[f"events.user_created[{names['welcome']}]"]
    welcome_task.apply((), {"email": "fails@example.com"}, task_id=f"emission-3:{names['welcome']}")
    flaky_task.apply((), {"email": "fails@example.com"}, task_id=f"emission-3:{names['flaky']}")
    assert ledger.done == {"emission-3": {names["welcome"]}}, "only the listener that completed"
    first_round = calls.count("flaky:fails@example.com")  # eager apply runs Celery's retries inline
    welcome_task.apply((), {"email": "fails@example.com"}, task_id=f"emission-3:{names['welcome']}")
    flaky_task.apply((), {"email": "fails@example.com"}, task_id=f"emission-3:{names['flaky']}")
    assert calls.count("welcome:fails@example.com") == 1
    assert calls.count("flaky:fails@example.com") == 2 * first_round, "the failed listener runs again"


def test_an_unreachable_ledger_never_stops_a_listener(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    calls.clear()
    ledger = MemoryLedger()
    ledger.down = True
    celery_app, _ = _tasks(tmp_path, ledger)
    with caplog.at_level("WARNING", "litestar_celery_events.worker"):
        celery_app.tasks["events.user_created"].apply((), {"email": "b@example.com"}, task_id="emission-4")
        celery_app.tasks["events.user_created"].apply((), {"email": "b@example.com"}, task_id="emission-4")
    assert calls.count("welcome:b@example.com") == 2, "at-least-once when the ledger is away"
    assert "cannot read the listener ledger (memory)" in caplog.text
    assert "listeners run anyway (at-least-once)" in caplog.text


def test_the_redis_ledger_remembers_completed_runs_for_its_retention(redis_url: str) -> None:
    ledger = RedisListenerLedger(redis_settings_for_url(redis_url).open(), "test:done", retention_s=0.3)
    assert ledger.completed("e1") == set()
    ledger.record("e1", "mod.welcome")
    ledger.record("e1", "mod.flaky")
    assert ledger.completed("e1") == {"mod.welcome", "mod.flaky"}
    time.sleep(0.5)
    assert ledger.completed("e1") == set(), "forgotten after the retention window"
    ledger.close()


def test_the_sql_ledger_keeps_one_row_per_pair_and_prunes_old_ones(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
    table = ledger_table(MetaData())
    table.create(engine)
    ledger = SqlListenerLedger(engine, table, retention_s=0.3)
    ledger.record("e1", "mod.welcome")
    ledger.record("e1", "mod.welcome")  # a duplicate that raced: no error
    assert ledger.completed("e1") == {"mod.welcome"}
    time.sleep(0.4)
    assert ledger.completed("e1") == set()
    ledger._next_prune = 0.0
    ledger.record("e2", "mod.welcome")
    with engine.connect() as conn:
        assert conn.execute(table.select()).all()[0].emission_id == "e2", "the old pair was pruned"
    ledger.close()
