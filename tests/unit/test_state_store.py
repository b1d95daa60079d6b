"""The shared state store: which store a config resolves to, and cancels and ticks on every backend."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from litestar_celery_events import CeleryEventsConfig
from litestar_celery_events.brokers import redis_settings_for_url
from litestar_celery_events.celery_app import build_celery_app
from litestar_celery_events.errors import StateStoreError
from litestar_celery_events.stores import state as state_module
from litestar_celery_events.stores.schedule import ArrivalCheckedStore, RedisFateStore, SqliteScheduleStore
from litestar_celery_events.stores.sql_state import SqlScheduleStore, SqlState
from litestar_celery_events.stores.state import check_state_store, state_store_of, warn_if_not_shared


def _state(**config: object) -> state_module.StateStore:
    made = CeleryEventsConfig(**config)  # type: ignore[arg-type]
    return state_store_of(made, build_celery_app(made))


def test_the_broker_redis_holds_the_state_with_kombus_key_prefix() -> None:
    state = _state(
        broker_url="redis://:secret@localhost/0",
        celery_config={"broker_transport_options": {"global_keyprefix": "t1:"}},
    )
    assert (state.kind, state.key_prefix, state.one_machine) == ("redis", "t1:", False)
    assert "secret" not in state.location


def test_without_redis_or_outbox_the_state_is_sqlite_under_data_dir(tmp_path: Path) -> None:
    state = _state(broker_url="amqp://guest:guest@localhost//", data_dir=str(tmp_path))
    assert (state.kind, state.local_dir, state.one_machine) == ("local", tmp_path, True)


def test_state_url_names_a_database_or_a_redis(tmp_path: Path) -> None:
    sql = _state(broker_url="amqp://localhost//", state_url="postgresql+psycopg://app:pw@db:5432/app")
    assert (sql.kind, sql.one_machine) == ("sql", False)
    assert "pw" not in sql.location and "pw" not in repr(sql)
    redis = _state(broker_url="amqp://localhost//", state_url="redis://:pw@cache:6379/2")
    assert (redis.kind, redis.key_prefix) == ("redis", "")
    assert "pw" not in redis.location
    assert _state(broker_url="amqp://localhost//", state_url=f"sqlite:///{tmp_path}/s.db").one_machine


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("ftp://user:pw@x/y", "neither a Redis URL"),
        ("sqlite://", "in-memory SQLite"),
        ("sqlite:///:memory:", "in-memory SQLite"),
    ],
)
def test_a_state_url_that_cannot_work_is_refused_naming_it(url: str, match: str) -> None:
    with pytest.raises(StateStoreError, match=match) as caught:
        _state(broker_url="amqp://localhost//", state_url=url)
    assert "pw" not in str(caught.value)


def test_failed_store_url_is_the_old_name_of_state_url(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    with pytest.warns(DeprecationWarning, match="use state_url"):
        config = CeleryEventsConfig(broker_url="amqp://localhost//", failed_store_url=url)
    assert state_store_of(config, build_celery_app(config)).kind == "sql"
    with pytest.raises(ValueError, match="name different stores"):
        CeleryEventsConfig(failed_store_url=url, state_url="redis://localhost/0")


def test_a_broker_other_hosts_reach_with_a_local_store_warns_naming_state_url(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(state_module, "_warned", False)
    config = CeleryEventsConfig(broker_url="amqp://guest:secret@rabbit//", data_dir=str(tmp_path))
    with caplog.at_level(logging.WARNING, "litestar_celery_events"):
        warn_if_not_shared(config, build_celery_app(config), "celery worker")
        warn_if_not_shared(config, build_celery_app(config), "celery worker")  # once per process
    warnings = [r.getMessage() for r in caplog.records if "state_url" in r.getMessage()]
    assert len(warnings) == 1
    assert "celery worker" in warnings[0] and "secret" not in warnings[0]
    caplog.clear()
    monkeypatch.setattr(state_module, "_warned", False)
    embedded = CeleryEventsConfig(data_dir=str(tmp_path))  # one machine by design: no warning
    with caplog.at_level(logging.WARNING, "litestar_celery_events"):
        warn_if_not_shared(embedded, build_celery_app(embedded), "celery worker")
    assert not caplog.records


def test_an_unreachable_state_url_stops_start_up_naming_the_setting() -> None:
    config = CeleryEventsConfig(broker_url="amqp://localhost//", state_url="redis://:pw@127.0.0.1:1/0")
    with pytest.raises(StateStoreError, match=r"celery worker: the state store .*state_url.* cannot be reached") as e:
        check_state_store(config, build_celery_app(config), "celery worker", timeout_s=1.0)
    assert "pw" not in str(e.value)


@pytest.fixture(params=["sqlite-data-dir", "sql-sqlite", "sql-postgresql", "redis"])
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[ArrivalCheckedStore, ArrivalCheckedStore]]:
    """Two handles on one store, as two hosts would hold them."""
    if request.param == "sqlite-data-dir":
        made: list[ArrivalCheckedStore] = [SqliteScheduleStore(tmp_path / "s.sqlite3") for _ in range(2)]
    elif request.param == "sql-sqlite":
        made = [SqlScheduleStore(SqlState(f"sqlite:///{tmp_path}/s.db")) for _ in range(2)]
    elif request.param == "sql-postgresql":
        url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{request.getfixturevalue('pg_database')}"
        made = [SqlScheduleStore(SqlState(url)) for _ in range(2)]
    else:
        settings = redis_settings_for_url(request.getfixturevalue("redis_url"))
        prefix = f"test-{uuid.uuid4().hex[:6]}:"
        made = [RedisFateStore(settings.open(), prefix) for _ in range(2)]
    yield made[0], made[1]
    for store in made:
        store.close()


def test_a_cancel_on_one_host_stops_the_run_on_another(stores: tuple[ArrivalCheckedStore, ...]) -> None:
    web, worker = stores
    cancelled, ran = f"e-{uuid.uuid4().hex}", f"e-{uuid.uuid4().hex}"
    assert web.cancel(cancelled, due_ts=None) is True
    assert worker.may_run(cancelled) is False
    assert worker.may_run(cancelled) is False  # a redelivery is still stopped
    assert worker.may_run(ran) is True
    assert web.cancel(ran) is False  # too late: it ran
    assert worker.may_run(ran) is True  # a redelivery of a dispatched one runs (at-least-once)


def test_each_tick_is_claimed_once_by_racing_beats(stores: tuple[ArrivalCheckedStore, ...]) -> None:
    name = f"tick-{uuid.uuid4().hex[:6]}"
    wins: list[float] = []
    lock = threading.Lock()

    def beat(store: ArrivalCheckedStore) -> None:
        for slot in range(1, 21):
            if store.claim_tick(name, float(slot)):
                with lock:
                    wins.append(float(slot))

    threads = [threading.Thread(target=beat, args=(store,)) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(wins) == [float(slot) for slot in range(1, 21)]
    assert stores[0].last_tick(name) == 20.0
    assert stores[1].claim_tick(name, 5.0) is False  # an older tick never fires again
