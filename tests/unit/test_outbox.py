"""The transactional outbox on SQLite files with a scripted transport (no broker): what a commit, a
rollback and a failed commit do to held emissions, the rows, the relay's claims and start-up errors."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import pytest
from advanced_alchemy.extensions.litestar import SQLAlchemyAsyncConfig, SQLAlchemyPlugin, SQLAlchemySyncConfig
from litestar import Litestar, Request, post
from litestar.di import NamedDependency
from litestar.enums import RequestEncodingType
from litestar.events import listener
from litestar.params import Body
from sqlalchemy import MetaData, create_engine, event, text
from sqlalchemy.orm import Session

from litestar_celery_events import CeleryEventEmitter, CeleryEventsConfig, CeleryEventsPlugin, SQLAlchemyOutbox
from litestar_celery_events.contract.message import Emission
from litestar_celery_events.errors import OutboxConfigError
from litestar_celery_events.stores.outbox import OutboxStore, outbox_table, write_rows
from litestar_celery_events.transports.base import MessageRefused
from tests.helpers import wait_for


class RecordingTransport:
    def __init__(self) -> None:
        self.sent: list[str] = []
        self.down = False
        self.refuse: set[str] = set()

    def publish(self, batch: list[Emission], done: list[int]) -> None:
        for emission in batch:
            if self.down:
                raise ConnectionError("broker down")
            if emission.emission_id in self.refuse:
                raise MessageRefused("over the broker's size limit")
            self.sent.append(emission.event_id)
            done[0] += 1

    def close(self) -> None:
        pass


@listener("user_created")
def welcome(email: str) -> None: ...


def _app(tmp_path: Path, alchemy: Any = None, in_app: bool = True, **config: Any) -> Litestar:
    alchemy = alchemy or SQLAlchemySyncConfig(connection_string=f"sqlite:///{tmp_path / 'app.sqlite3'}")
    events = CeleryEventsConfig(data_dir=str(tmp_path), outbox=SQLAlchemyOutbox(alchemy), **config)
    plugins: list[Any] = [SQLAlchemyPlugin(alchemy)] if in_app else []
    # No Litestar logging config: its queue handler would keep our records from caplog.
    return Litestar(listeners=[welcome], plugins=[*plugins, CeleryEventsPlugin(events)], logging_config=None)


def _started(app: Litestar, create_table: bool = True) -> tuple[CeleryEventEmitter, RecordingTransport, Any]:
    emitter = app.event_emitter
    assert isinstance(emitter, CeleryEventEmitter)
    assert emitter.outbox is not None
    transport = RecordingTransport()
    emitter.publisher._transport = transport
    emitter.outbox.relay._transport = transport
    url = emitter.outbox.outbox.database_url()
    engine = create_engine(url)
    if create_table:
        emitter.outbox.table.create(engine, checkfirst=True)
    emitter.start()
    return emitter, transport, engine


def _rows(engine: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM celery_events_outbox")).scalar_one())


def test_emits_bound_to_a_sync_session_go_out_only_after_its_commit_and_their_rows_are_cleared(tmp_path: Path) -> None:
    app = _app(tmp_path)
    emitter, transport, engine = _started(app)
    outbox = emitter.config.outbox
    assert outbox is not None
    inserts: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *a: inserts.append(a[2]) if "INSERT" in a[2] else None)
    write_now = emitter.publisher.write_now
    handed_over: list[int] = []
    emitter.publisher.write_now = lambda: (handed_over.append(emitter.publisher.emitted), write_now())  # type: ignore[method-assign]
    with Session(engine) as session, outbox.bind(session):
        session.execute(text("SELECT 1"))  # a transaction is open
        for n in range(3):
            app.emit("user_created", email=f"{n}@example.com")
        time.sleep(0.1)
        assert transport.sent == [], "nothing goes out before the commit"
        session.commit()
    assert len(inserts) == 1, "one multi-row INSERT at commit, not one per emit"
    assert handed_over == [3], "after the commit, the publisher is asked once to write the three at once"
    wait_for(lambda: transport.sent == ["user_created"] * 3, what="the three events")
    wait_for(lambda: _rows(engine) == 0, what="their rows to be deleted")
    emitter.stop()
    emitter.outbox.stop()


def test_a_failure_to_write_at_once_after_the_commit_does_not_fail_the_commit_or_lose_the_events(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = _app(tmp_path)
    emitter, transport, engine = _started(app)
    outbox = emitter.config.outbox
    assert outbox is not None

    def broken() -> None:
        raise RuntimeError("write failed")

    emitter.publisher.write_now = broken  # type: ignore[method-assign]
    log = caplog.at_level(logging.ERROR, "litestar_celery_events.outbox")
    with log, Session(engine) as session, outbox.bind(session):
        session.execute(text("SELECT 1"))
        app.emit("user_created", email="a@example.com")
        session.commit()  # does not raise
    assert "writing committed events at once failed" in caplog.text
    wait_for(lambda: transport.sent == ["user_created"], what="the committed event, by the usual path")
    wait_for(lambda: _rows(engine) == 0, what="its row to be deleted")
    emitter.stop()
    emitter.outbox.stop()


def test_a_rollback_or_a_failed_commit_drops_the_held_emits(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    app = _app(tmp_path)
    emitter, transport, engine = _started(app)
    outbox = emitter.config.outbox
    assert outbox is not None
    with Session(engine) as session, outbox.bind(session):
        session.execute(text("SELECT 1"))
        app.emit("user_created", email="rolled-back@example.com")
        session.rollback()
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE strict (id INTEGER PRIMARY KEY, CHECK (id > 0))"))
    log = caplog.at_level(logging.WARNING, "litestar_celery_events.outbox")
    with log, Session(engine) as session, outbox.bind(session):
        session.execute(text("SELECT 1"))
        app.emit("user_created", email="failed-commit@example.com")

        @event.listens_for(session, "before_commit")
        def break_the_commit(_: Session) -> None:
            session.execute(text("INSERT INTO strict (id) VALUES (-1)"))

        with pytest.raises(Exception, match="CHECK"):
            session.commit()
    assert "1 event(s) not published: the commit failed (user_created)" in caplog.text
    app.emit("user_created", email="no-transaction@example.com")  # no binding, no request: at once
    wait_for(lambda: transport.sent == ["user_created"], what="the unbound event")
    time.sleep(0.2)
    assert transport.sent == ["user_created"]
    assert _rows(engine) == 0
    assert emitter.outbox.dropped == 2
    emitter.stop()
    emitter.outbox.stop()


def test_emits_bound_to_an_async_session_follow_its_transaction(tmp_path: Path) -> None:
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    url = f"sqlite+aiosqlite:///{tmp_path / 'app.sqlite3'}"
    app = _app(tmp_path, SQLAlchemyAsyncConfig(connection_string=url))
    emitter, transport, engine = _started(app)
    outbox = emitter.config.outbox
    assert outbox is not None

    async def run() -> None:
        async_engine = create_async_engine(url)
        async with AsyncSession(async_engine) as session:
            async with outbox.bind(session), session.begin():
                await session.execute(text("SELECT 1"))
                app.emit("user_created", email="a@example.com")
                assert transport.sent == []
            transaction = await session.begin()
            async with outbox.bind(transaction):  # a transaction binds its session
                await session.execute(text("SELECT 1"))
                app.emit("user_created", email="never@example.com")
                await transaction.rollback()
        await async_engine.dispose()

    asyncio.run(run())
    wait_for(lambda: transport.sent == ["user_created"], what="the committed event")
    wait_for(lambda: _rows(engine) == 0, what="its row to be deleted")
    emitter.stop()
    emitter.outbox.stop()


def test_rows_whose_owner_is_gone_are_relayed_once_even_by_two_relays(tmp_path: Path) -> None:
    app = _app(tmp_path, outbox_relay_after_s=60)
    emitter, _, engine = _started(app)
    assert emitter.outbox is not None
    table = emitter.outbox.table
    emissions = [emitter.prepare("user_created", (), {"email": f"{n}@example.com"}) for n in range(250)]
    with engine.begin() as conn:
        write_rows(conn, table, emissions[:200], "dead-host:1:abc", lease_s=-1.0)  # lease ran out
        write_rows(conn, table, emissions[200:], "live-host:2:def", lease_s=60.0)
    stores = [OutboxStore.from_url(emitter.outbox.outbox.database_url(), table) for _ in range(2)]
    claimed: list[list[str]] = [[], []]

    def relay(index: int) -> None:
        now = time.time()
        while batch := stores[index].claim(f"relay-{index}", now, now + 60, limit=20):
            claimed[index].extend(c.emission.emission_id for c in batch)
            assert {c.previous_owner for c in batch} == {"dead-host:1:abc"}

    threads = [threading.Thread(target=relay, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    everything = claimed[0] + claimed[1]
    assert sorted(everything) == sorted(e.emission_id for e in emissions[:200]), "each orphan claimed exactly once"
    relayed = stores[0].claim("relay-0", time.time() + 61, time.time() + 120, limit=1000)
    owners = {c.previous_owner for c in relayed}
    assert "live-host:2:def" in owners
    assert owners - {"live-host:2:def"} <= {"relay-0", "relay-1"}, "the claims gave the rows to their relay"
    assert len(relayed) == 250
    status = stores[0].status(now=time.time() + 200)
    assert status.depth == 250
    assert status.relay_lag_s > 0
    rebuilt = relayed[0].emission
    original = next(e for e in emissions if e.emission_id == rebuilt.emission_id)
    assert (rebuilt.body, rebuilt.task_name, rebuilt.kwargs) == (original.body, original.task_name, original.kwargs)
    for store in stores:
        store.close()
    emitter.stop()
    emitter.outbox.stop()


def test_the_relay_thread_publishes_and_deletes_orphaned_rows_and_logs_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = _app(tmp_path, outbox_relay_after_s=0.4)
    emitter, transport, engine = _started(app)
    assert emitter.outbox is not None
    emissions = [emitter.prepare("user_created", (), {"email": f"{n}@example.com"}) for n in range(5)]
    with engine.begin() as conn:
        write_rows(conn, emitter.outbox.table, emissions, "dead-host:1:abc", lease_s=0.0)
    with caplog.at_level(logging.WARNING, "litestar_celery_events.outbox"):
        emitter.outbox.relay.ensure_started(relay=True)
        wait_for(lambda: len(transport.sent) == 5, what="the relayed events")
        wait_for(lambda: _rows(engine) == 0, what="the relayed rows to be deleted")
    assert "relayed 5 event(s)" in caplog.text
    assert "dead-host:1:abc" in caplog.text
    emitter.stop()
    emitter.outbox.stop()


def test_start_up_names_the_fix_for_a_config_not_in_the_app_a_missing_table_or_an_in_memory_database(
    tmp_path: Path,
) -> None:
    async def start(app: Litestar) -> None:
        async with app.lifespan():
            pass

    with pytest.raises(OutboxConfigError, match=r"not in this app.*SQLAlchemyPlugin\(config\)"):
        asyncio.run(start(_app(tmp_path, in_app=False)))
    with pytest.raises(OutboxConfigError, match=r"'celery_events_outbox' does not exist.*create_all=True"):
        asyncio.run(start(_app(tmp_path)))
    memory = SQLAlchemySyncConfig(connection_string="sqlite://")
    with pytest.raises(OutboxConfigError, match="in-memory SQLite"):
        asyncio.run(start(_app(tmp_path, memory)))


def test_the_table_can_join_any_metadata_for_alembic() -> None:
    metadata = MetaData()
    table = outbox_table(metadata, "my_outbox")
    assert outbox_table(metadata, "my_outbox") is table
    assert {c.name for c in table.columns} == {"id", "event_id", "owner", "created_at", "lease_until", "message"}


def test_events_status_shows_outbox_depth_oldest_row_and_relay_lag(tmp_path: Path) -> None:
    from litestar_celery_events.cli import status_of

    app = _app(tmp_path, outbox_relay_after_s=60)
    emitter, _, engine = _started(app)
    assert emitter.outbox is not None
    emissions = [emitter.prepare("user_created", (), {"email": f"{n}@example.com"}) for n in range(3)]
    with engine.begin() as conn:
        write_rows(conn, emitter.outbox.table, emissions[:2], "dead-host:1:abc", lease_s=-5.0)
        write_rows(conn, emitter.outbox.table, emissions[2:], "live-host:2:def", lease_s=60.0)
    outbox = status_of(app)["outbox"]
    assert outbox["table"] == "celery_events_outbox"
    assert outbox["depth"] == 3
    assert outbox["overdue"] == 2
    assert 5.0 <= outbox["relay_lag_s"] < 30.0
    assert 0.0 <= outbox["oldest_row_age_s"] < 30.0
    emitter.stop()
    emitter.outbox.stop()


def test_with_the_broker_down_after_commit_events_wait_in_their_rows_and_go_out_when_it_is_back(
    tmp_path: Path,
) -> None:
    app = _app(tmp_path, outbox_relay_after_s=0.6)
    emitter, transport, engine = _started(app)
    outbox = emitter.config.outbox
    assert outbox is not None and emitter.outbox is not None
    transport.down = True
    emitter.outbox.relay.ensure_started(relay=True)  # this process also relays: it must not take its own row
    with Session(engine) as session, outbox.bind(session):
        session.execute(text("SELECT 1"))
        app.emit("user_created", email="waits@example.com")
        session.commit()
    time.sleep(1.5)  # past the lease: this live process keeps renewing it, so no relay takes the row
    assert _rows(engine) == 1
    with engine.connect() as conn:
        lease_until = conn.execute(text("SELECT lease_until FROM celery_events_outbox")).scalar_one()
    assert lease_until > time.time(), "the owner renewed the lease of the row it still holds"
    transport.down = False
    wait_for(lambda: transport.sent == ["user_created"], timeout=10, what="the event after the outage")
    wait_for(lambda: _rows(engine) == 0, what="its row to be deleted")
    time.sleep(0.5)
    assert transport.sent == ["user_created"], "published once"
    emitter.stop()
    emitter.outbox.stop()


@post("/users", sync_to_thread=True, status_code=201)
def create_user_sync(
    data: Annotated[dict[str, str], Body(media_type=RequestEncodingType.JSON)],
    request: Request[Any, Any, Any],
    db_session: NamedDependency[Session],
) -> None:
    db_session.execute(text("INSERT INTO users (email) VALUES (:email)"), {"email": data["email"]})
    request.app.emit("user_created", email=data["email"])
    assert request.app.state.transport.sent == [], "held until the commit, which autocommit runs after the handler"
    if data.get("fail"):
        raise ValueError("after emit")


def test_a_sync_handler_on_a_sync_session_holds_its_emit_until_the_autocommit(tmp_path: Path) -> None:
    from litestar.testing import TestClient

    url = f"sqlite:///{tmp_path / 'app.sqlite3'}"
    alchemy = SQLAlchemySyncConfig(connection_string=url, before_send_handler="autocommit")
    events = CeleryEventsConfig(data_dir=str(tmp_path), outbox=SQLAlchemyOutbox(alchemy))
    app = Litestar(
        route_handlers=[create_user_sync],
        listeners=[welcome],
        plugins=[SQLAlchemyPlugin(alchemy), CeleryEventsPlugin(events)],
        logging_config=None,
    )
    emitter = app.event_emitter
    assert isinstance(emitter, CeleryEventEmitter) and emitter.outbox is not None
    transport = app.state.transport = RecordingTransport()
    emitter.publisher._transport = transport
    engine = create_engine(url)
    emitter.outbox.table.create(engine)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE users (email TEXT PRIMARY KEY)"))
    with TestClient(app) as client:
        assert client.post("/users", json={"email": "a@example.com"}).status_code == 201
        wait_for(lambda: transport.sent == ["user_created"], what="the committed event")
        assert client.post("/users", json={"email": "b@example.com", "fail": "1"}).status_code == 500
        time.sleep(0.3)
    assert transport.sent == ["user_created"], "nothing for the request that failed after emit"
    with engine.connect() as conn:
        assert conn.execute(text("SELECT email FROM users")).scalars().all() == ["a@example.com"]


def test_a_worker_of_an_app_whose_outbox_table_is_missing_does_not_start(tmp_path: Path) -> None:
    from litestar_celery_events import OutboxConfigError as PublicOutboxConfigError
    from litestar_celery_events import create_worker_app

    assert PublicOutboxConfigError is OutboxConfigError
    with pytest.raises(OutboxConfigError, match=r"does not exist.*create_all=True"):
        create_worker_app(_app(tmp_path))


def test_a_relayed_row_the_broker_refuses_goes_to_the_failed_store_and_the_rest_go_out(tmp_path: Path) -> None:
    from litestar_celery_events.stores.state import failed_store_for

    app = _app(tmp_path, outbox_relay_after_s=60)
    emitter, transport, engine = _started(app)
    assert emitter.outbox is not None
    emissions = [emitter.prepare("user_created", (), {"email": f"{n}@example.com"}) for n in range(3)]
    transport.refuse = {emissions[1].emission_id}
    with engine.begin() as conn:
        write_rows(conn, emitter.outbox.table, emissions, "dead-host:1:abc", lease_s=-1.0)
    relay = emitter.outbox.relay
    relay.ensure_started()
    while relay.relay_once():
        pass
    assert transport.sent == ["user_created", "user_created"]
    assert _rows(engine) == 0, "the refused row is not relayed again and again"
    store = failed_store_for(emitter.config, emitter.celery_app)
    assert [r["emission_id"] for r in store.records()] == [emissions[1].emission_id]
    store.close()
    emitter.stop()
    emitter.outbox.stop()
