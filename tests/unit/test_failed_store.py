"""The failed-events store on every backend: Redis (the private test server), SQLite under data_dir, and
an SQL state store (SQLite and PostgreSQL through SQLAlchemy)."""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from litestar_celery_events import CeleryEventsConfig
from litestar_celery_events.brokers import redis_settings_for_url
from litestar_celery_events.celery_app import build_celery_app
from litestar_celery_events.runtime.failures import ListenerFailure, failure_from_exception
from litestar_celery_events.stores.failed import FailedStore, RedisFailedStore, SqliteFailedStore, record_id
from litestar_celery_events.stores.sql_state import SqlFailedStore, SqlState
from litestar_celery_events.stores.state import failed_store_for


def _failure(
    emission: str = "em-1", listener: str = "app.listeners.send_mail", event: str = "user_created"
) -> ListenerFailure:
    try:
        raise RuntimeError("smtp down")
    except RuntimeError as exc:
        return failure_from_exception(
            exc,
            event_id=event,
            emission_id=emission,
            listener=listener,
            args=[1],
            kwargs={"at": datetime.datetime(2026, 1, 2, 3, 4, 5), "amount": Decimal("1.10"), "raw": b"\x00\xff"},
            attempts=4,
            permanent=False,
            emitted_at=123.0,
        )


@pytest.fixture(params=["redis", "sqlite", "sql-sqlite", "sql-postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FailedStore]:
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        made: FailedStore = RedisFailedStore(redis_settings_for_url(url).open(), f"test-{uuid.uuid4().hex[:8]}:failed")
    elif request.param == "sqlite":
        made = SqliteFailedStore(tmp_path / "failed.sqlite3")
    elif request.param == "sql-sqlite":
        made = SqlFailedStore(SqlState(f"sqlite:///{tmp_path}/state.db"))
    else:
        database = request.getfixturevalue("pg_database")
        made = SqlFailedStore(SqlState(f"postgresql+psycopg://postgres@127.0.0.1:5432/{database}"))
        made.purge()
    yield made
    made.purge()
    made.close()


def test_a_record_keeps_everything_needed_to_understand_and_replay_the_failure(store: FailedStore) -> None:
    rid = store.add(_failure())
    record = store.get(rid)
    assert record is not None
    assert record["id"] == rid == record_id("em-1", "app.listeners.send_mail")
    assert record["event_id"] == "user_created"
    assert record["emission_id"] == "em-1"
    assert record["exc_type"] == "builtins.RuntimeError"
    assert record["message"] == "smtp down"
    assert "RuntimeError: smtp down" in record["traceback"]
    assert record["attempts"] == 4
    assert record["emitted_at"] == 123.0
    assert record["failed_at"] > 0
    assert record["args"] == [1]
    assert record["kwargs"] == {
        "at": datetime.datetime(2026, 1, 2, 3, 4, 5),
        "amount": Decimal("1.10"),
        "raw": b"\x00\xff",
    }


def test_the_same_failure_recorded_twice_is_one_record(store: FailedStore) -> None:
    store.add(_failure())
    store.add(_failure())
    assert store.count() == 1


def test_records_filter_by_event_and_by_full_or_short_listener_name(store: FailedStore) -> None:
    store.add(_failure("a", "app.listeners.send_mail", "user_created"))
    store.add(_failure("b", "app.listeners.notify", "user_created"))
    store.add(_failure("c", "app.listeners.send_mail", "user_deleted"))
    assert [r["emission_id"] for r in store.records()] == ["a", "b", "c"]
    assert [r["emission_id"] for r in store.records(event_id="user_created")] == ["a", "b"]
    assert [r["emission_id"] for r in store.records(listener="send_mail")] == ["a", "c"]
    assert [r["emission_id"] for r in store.records(event_id="user_deleted", listener="app.listeners.send_mail")] == [
        "c"
    ]


def test_delete_and_purge_report_what_they_removed(store: FailedStore) -> None:
    ids = [store.add(_failure(str(n))) for n in range(3)]
    assert store.delete([ids[0], "missing"]) == 1
    assert store.get(ids[0]) is None
    assert store.purge() == 2
    assert store.count() == 0


def test_the_store_follows_the_broker(tmp_path: Path) -> None:
    def store_of(config: CeleryEventsConfig) -> FailedStore:
        return failed_store_for(config, build_celery_app(config))

    on_redis = store_of(CeleryEventsConfig(broker_url="redis://:secret@localhost:6379/0"))
    assert isinstance(on_redis, RedisFailedStore)
    assert "secret" not in on_redis.location
    assert on_redis.location.endswith("key events:failed")
    prefixed = store_of(
        CeleryEventsConfig(
            broker_url="redis://localhost/0",
            task_name_prefix="app",
            celery_config={"broker_transport_options": {"global_keyprefix": "tenant1:"}},
        )
    )
    assert prefixed.location.endswith("key tenant1:app:failed")
    on_amqp = store_of(CeleryEventsConfig(broker_url="amqp://guest:guest@localhost//", data_dir=str(tmp_path)))
    assert isinstance(on_amqp, SqliteFailedStore)
    assert on_amqp.path == tmp_path / "failed.sqlite3"
    with pytest.warns(DeprecationWarning, match="use state_url"):  # the old name still works, for one release
        explicit = store_of(CeleryEventsConfig(broker_url="amqp://x", failed_store_url=f"sqlite:///{tmp_path}/f.db"))
    assert isinstance(explicit, SqlFailedStore)
    assert explicit.location == f"sqlite:///{tmp_path}/f.db table celery_events_failed"


def test_a_password_in_a_listener_error_never_reaches_the_record() -> None:
    try:
        raise ConnectionError("cannot reach redis://app:s3cret@cache:6379/0")
    except ConnectionError as exc:
        failure = failure_from_exception(
            exc, event_id="e", emission_id="x", listener="l", args=[], kwargs={}, attempts=1, permanent=False
        )
    assert "s3cret" not in failure.message + failure.traceback
    assert "redis://app:***@cache:6379/0" in failure.message


def test_replay_runs_the_recorded_listener_only_with_the_original_emission_as_root() -> None:
    from litestar import Litestar

    from litestar_celery_events import CeleryEventsPlugin, listener
    from litestar_celery_events.cli.replay import ReplayError, replay_emission

    @listener("paid", queue="billing")
    def charge(order: int) -> None: ...

    @listener("paid")
    def notify(order: int) -> None: ...

    config = CeleryEventsConfig(broker_url="redis://localhost/0")
    app = Litestar(listeners=[charge, notify], plugins=[CeleryEventsPlugin(config)])
    registry = app.event_emitter.registry  # type: ignore[attr-defined]
    record = {
        "event_id": "paid",
        "emission_id": "em-7",
        "listener": charge.original_fn.__module__ + "." + charge.original_fn.__qualname__,
        "args": [],
        "kwargs": {"order": 7},
        "emitted_at": 5.0,
    }
    emission = replay_emission(record, registry, config)
    assert emission.task_name == f"events.paid[{record['listener']}]"
    assert emission.kwargs == {"order": 7}
    assert emission.queue == "billing"
    assert emission.extra_headers == {"root_id": "em-7"}
    assert emission.emission_id.startswith(f"em-7:{record['listener']}:replay-")
    assert emission.emitted_at == 5.0
    with pytest.raises(ReplayError, match="is not a listener of event 'paid'"):
        replay_emission({**record, "listener": "-"}, registry, config)
    with pytest.raises(ReplayError, match="event 'gone' has no listener"):
        replay_emission({**record, "event_id": "gone"}, registry, config)


def test_an_emission_the_broker_refuses_is_recorded_once_per_listener_with_its_arguments(tmp_path: Path) -> None:
    from litestar import Litestar

    from litestar_celery_events import CeleryEventsPlugin, listener
    from litestar_celery_events.contract.message import Emission

    @listener("paid")
    def charge(order: int) -> None: ...

    @listener("paid")
    def notify(order: int) -> None: ...

    state_url = f"sqlite:///{tmp_path}/state.db"
    config = CeleryEventsConfig(broker_url="redis://localhost/0", state_url=state_url)
    app = Litestar(listeners=[charge, notify], plugins=[CeleryEventsPlugin(config)])
    emitter = app.event_emitter
    emission = Emission.create("paid", "events.paid", (), {"order": 7}, max_payload_bytes=1000)
    emitter.record_refused(emission, "the message is 3000000 bytes, over this Redis server's limit")  # type: ignore[attr-defined]
    store = SqlFailedStore(SqlState(state_url))
    records = store.records(event_id="paid")
    assert sorted(r["listener"].rpartition(".")[2] for r in records) == ["charge", "notify"]
    assert {r["emission_id"] for r in records} == {emission.emission_id}
    assert all(r["kwargs"] == {"order": 7} and r["permanent"] for r in records)
    assert all("over this Redis server's limit" in r["message"] for r in records)
