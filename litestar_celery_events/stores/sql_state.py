"""The shared state in an SQL database (``state_url=postgresql+psycopg://...``, or the outbox's database).

Tables ``celery_events_failed``, ``celery_events_fates`` (a delayed emission is either cancelled or
dispatched, whichever is recorded first) and ``celery_events_ticks`` (beat's last claimed tick per
schedule), created if missing; ``state_tables(metadata)`` puts them on an app's metadata so Alembic
sees them. Every step is one statement or one short transaction that any database serialises the
same way (a conditional UPDATE, or an INSERT that a primary key refuses twice), so two hosts never
both cancel-and-run one emission nor both fire one tick.
"""

from __future__ import annotations

import importlib
import os
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

from sqlalchemy import Column, Float, MetaData, String, Table, Text, create_engine, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from litestar_celery_events.brokers import MAX_AMQP_DELAY_S
from litestar_celery_events.stores.failed import dumps_record, failure_record, loads_record, matches
from litestar_celery_events.stores.ledger import ledger_table
from litestar_celery_events.stores.outbox import sync_url
from litestar_celery_events.stores.schedule import CANCEL_MEMORY_S

if TYPE_CHECKING:
    from collections.abc import Iterable

    from sqlalchemy.engine import Connection, Engine

    from litestar_celery_events.contract.failures import ListenerFailure

__all__ = ("SqlFailedStore", "SqlScheduleStore", "SqlState", "state_tables")

CANCELLED, DISPATCHED = "cancelled", "dispatched"
PRUNE_EVERY_S = 60.0


def state_tables(metadata: MetaData) -> tuple[Table, Table, Table]:
    """(failed, fates, ticks) on ``metadata``; the ledger's table joins them (``ledger_table``)."""
    ledger_table(metadata)
    if "celery_events_failed" in metadata.tables:
        t = metadata.tables
        return t["celery_events_failed"], t["celery_events_fates"], t["celery_events_ticks"]
    failed = Table(
        "celery_events_failed",
        metadata,
        Column("id", String(16), primary_key=True, comment="one record per (emission, listener)"),
        Column("event_id", String(200), nullable=False),
        Column("listener", String(300), nullable=False),
        Column("failed_at", Float, nullable=False, index=True),
        Column("record", Text, nullable=False, comment="the failure as JSON (kombu's encoding)"),
    )
    fates = Table(
        "celery_events_fates",
        metadata,
        Column("id", String(64), primary_key=True, comment="emission id of a delayed event"),
        Column("fate", String(10), nullable=False, comment="cancelled or dispatched: whichever came first"),
        Column("forget_after", Float, nullable=False, index=True),
    )
    ticks = Table(
        "celery_events_ticks",
        metadata,
        Column("name", String(300), primary_key=True, comment="periodic schedule name"),
        Column("slot", Float, nullable=False, comment="latest tick claimed (unix time)"),
    )
    return failed, fates, ticks


def _insert_new(conn: Connection, table: Table, **values: Any) -> bool:
    """Insert a row unless its primary key exists (then nothing); True if this call inserted it."""
    if conn.dialect.name in ("postgresql", "sqlite"):  # waits for a concurrent insert of the same key
        dialect = importlib.import_module(f"sqlalchemy.dialects.{conn.dialect.name}")
        key = next(iter(table.primary_key.columns))  # rowcount is -1 here on some drivers: RETURNING tells
        statement = dialect.insert(table).values(**values).on_conflict_do_nothing().returning(key)
        return conn.execute(statement).first() is not None
    try:
        with conn.begin_nested():
            conn.execute(insert(table).values(**values))
    except IntegrityError:
        return False
    return True


def _dispose(engine: Engine, pid: int) -> None:
    """Close the engine's connections in the process that opened them; a forked child only forgets them."""
    engine.dispose(close=os.getpid() == pid)


class SqlState:
    """A small blocking engine of its own (remade in a forked child) and the state's tables."""

    def __init__(self, url: str, timeout_s: float | None = None) -> None:
        self.metadata = MetaData()
        self.failed, self.fates, self.ticks = state_tables(self.metadata)
        self.ledger = ledger_table(self.metadata)
        self._url = sync_url(url)
        self._timeout_s = timeout_s
        self._engine: Engine | None = None
        self._pid = -1
        self._lock = threading.Lock()
        self.location = self._url.render_as_string(hide_password=True)

    @property
    def engine(self) -> Engine:
        if self._engine is None or self._pid != os.getpid():
            with self._lock:
                if self._engine is None or self._pid != os.getpid():
                    self._engine = self._create()
                    self._pid = os.getpid()
        return self._engine

    def _create(self) -> Engine:
        connect_args: dict[str, Any] = {}
        if self._url.get_backend_name() == "sqlite":
            connect_args["timeout"] = 30.0  # several processes share the file: wait for its lock
        elif self._timeout_s is not None and self._url.get_backend_name() == "postgresql":
            connect_args["connect_timeout"] = max(1, int(self._timeout_s))
        engine = create_engine(self._url, pool_pre_ping=True, pool_size=2, connect_args=connect_args)
        # Another process may create a table between the check and the CREATE; each retry gets past
        # at least one table, so one attempt per table always suffices.
        for attempts_left in range(len(self.metadata.tables), -1, -1):
            try:
                self.metadata.create_all(engine, checkfirst=True)
                break
            except SQLAlchemyError:
                if not attempts_left:
                    raise
        weakref.finalize(self, _dispose, engine, os.getpid())  # a store nobody closed closes its connections
        return engine

    def check(self) -> None:
        """Reach the database now (start-up), creating the tables if missing."""
        with self.engine.connect() as conn:
            conn.execute(select(1))

    def close(self) -> None:
        if self._engine is not None:
            _dispose(self._engine, self._pid)
        self._engine = None


class SqlFailedStore:
    """Failed-event records in the state database (see ``stores.failed`` for what a record is)."""

    def __init__(self, state: SqlState) -> None:
        self._state = state
        self._table = state.failed
        self.location = f"{state.location} table {self._table.name}"

    def add(self, failure: ListenerFailure) -> str:
        record = failure_record(failure)
        values = {
            "event_id": record["event_id"],
            "listener": record["listener"],
            "failed_at": record["failed_at"],
            "record": dumps_record(record),
        }
        table = self._table
        overwrite = update(table).where(table.c.id == record["id"]).values(**values)
        with self._state.engine.begin() as conn:  # the same failure again overwrites its record
            if not conn.execute(overwrite).rowcount and not _insert_new(conn, table, id=record["id"], **values):
                conn.execute(overwrite)  # written by another worker meanwhile
        return str(record["id"])

    def records(self, event_id: str | None = None, listener: str | None = None) -> list[dict[str, Any]]:
        table = self._table
        with self._state.engine.connect() as conn:
            rows = conn.execute(select(table.c.record).order_by(table.c.failed_at, table.c.id)).scalars()
            return [r for r in (loads_record(row) for row in rows) if matches(r, event_id, listener)]

    def get(self, record_id: str) -> dict[str, Any] | None:
        with self._state.engine.connect() as conn:
            raw = conn.execute(select(self._table.c.record).where(self._table.c.id == record_id)).scalar()
        return None if raw is None else loads_record(raw)

    def delete(self, record_ids: Iterable[str]) -> int:
        ids = list(record_ids)
        if not ids:
            return 0
        with self._state.engine.begin() as conn:
            return int(conn.execute(delete(self._table).where(self._table.c.id.in_(ids))).rowcount)

    def purge(self) -> int:
        with self._state.engine.begin() as conn:
            return int(conn.execute(delete(self._table)).rowcount)

    def count(self) -> int:
        with self._state.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(self._table)).scalar_one())

    def close(self) -> None:
        self._state.close()


class SqlScheduleStore:
    """Cancels and beat's ticks in the state database, for brokers that carry the delay themselves."""

    def __init__(self, state: SqlState) -> None:
        self._state = state
        self._next_prune = 0.0
        self.location = state.location

    def _decide(self, emission_id: str, fate: str, forget_after: float) -> bool:
        """Record ``fate`` for ``emission_id`` unless another was recorded first; True if ``fate`` holds."""
        table, now = self._state.fates, time.time()
        with self._state.engine.begin() as conn:
            if now >= self._next_prune:
                self._next_prune = now + PRUNE_EVERY_S
                conn.execute(delete(table).where(table.c.forget_after < now))
            if _insert_new(conn, table, id=emission_id, fate=fate, forget_after=forget_after):
                return True
            return conn.execute(select(table.c.fate).where(table.c.id == emission_id)).scalar() == fate

    def cancel(self, emission_id: str, due_ts: float | None = None) -> bool:
        now = time.time()
        forget_after = (now + MAX_AMQP_DELAY_S if due_ts is None else max(now, due_ts)) + CANCEL_MEMORY_S
        return self._decide(emission_id, CANCELLED, forget_after)

    def may_run(self, emission_id: str) -> bool:
        """Called by the event task of a delayed emission: False if it was cancelled."""
        return self._decide(emission_id, DISPATCHED, time.time() + CANCEL_MEMORY_S)

    def claim_tick(self, name: str, slot: float) -> bool:
        table = self._state.ticks
        with self._state.engine.begin() as conn:
            if conn.execute(update(table).where(table.c.name == name, table.c.slot < slot).values(slot=slot)).rowcount:
                return True
            # No row yet, or one with this tick or a later one: another beat claimed it.
            return _insert_new(conn, table, name=name, slot=slot)

    def last_tick(self, name: str) -> float | None:
        table = self._state.ticks
        with self._state.engine.connect() as conn:
            slot = conn.execute(select(table.c.slot).where(table.c.name == name)).scalar()
        return None if slot is None else float(slot)

    def close(self) -> None:
        self._state.close()
