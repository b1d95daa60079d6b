"""The transactional outbox table and the SQL a relay needs (sync SQLAlchemy, its own small engine).

A row is one emission written in the transaction that emitted it. Its owner (the process that
committed it) publishes it from memory right after the commit and deletes the row; while it has
not, it keeps renewing the row's lease. A row whose lease ran out belongs to a process that is
gone: any live process of the app claims it (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, SQLite's
single writer elsewhere), publishes it and deletes it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec
from sqlalchemy import (
    ARRAY,
    Column,
    Float,
    Index,
    MetaData,
    String,
    Table,
    Text,
    any_,
    bindparam,
    create_engine,
    func,
    insert,
    select,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from litestar_celery_events.contract.message import Emission
from litestar_celery_events.errors import OutboxConfigError

if TYPE_CHECKING:
    from collections.abc import Collection, Iterable, Sequence

    from sqlalchemy.engine import URL, Connection, Dialect, Engine

__all__ = (
    "DEFAULT_OUTBOX_TABLE",
    "OutboxStatus",
    "OutboxStore",
    "OutboxTableMissingError",
    "emission_of",
    "outbox_rows",
    "outbox_table",
    "sync_url",
    "write_rows",
)

DEFAULT_OUTBOX_TABLE = "celery_events_outbox"
ID_CHUNK = 1000
"""Most ids in one ``IN (...)`` list (well under every driver's bound-parameter limit)."""

_SYNC_DRIVERS = {"asyncpg": "psycopg", "aiosqlite": "pysqlite", "aiomysql": "pymysql", "asyncmy": "pymysql"}


class OutboxTableMissingError(OutboxConfigError):
    """The outbox table does not exist in the database the outbox is configured with."""


def outbox_table(metadata: MetaData, name: str = DEFAULT_OUTBOX_TABLE) -> Table:
    """The outbox table on ``metadata`` (so ``create_all`` and Alembic autogenerate see it)."""
    existing = metadata.tables.get(name)
    if existing is not None:
        return existing
    return Table(
        name,
        metadata,
        Column("id", String(64), primary_key=True, comment="emission id (also the Celery task id)"),
        Column("event_id", String(200), nullable=False),
        Column("owner", String(100), nullable=False, comment="the process that committed the row"),
        Column("created_at", Float, nullable=False, comment="unix time of the commit"),
        Column("lease_until", Float, nullable=False, comment="after this unix time any live process relays it"),
        Column("message", Text, nullable=False, comment="the Celery message: task, JSON body, headers"),
        Index(f"ix_{name}_lease_until", "lease_until"),
    )


def sync_url(url: URL | str) -> URL:
    """The same database through a blocking driver (the relay runs in a thread, not on a loop)."""
    parsed = make_url(url)
    backend, _, driver = parsed.drivername.partition("+")
    if driver in _SYNC_DRIVERS:
        parsed = parsed.set(drivername=f"{backend}+{_SYNC_DRIVERS[driver]}")
    return parsed


def _message(emission: Emission) -> str:
    fields: dict[str, Any] = {"task": emission.task_name, "body": emission.body.decode(), "at": emission.emitted_at}
    for key, value in (
        ("queue", emission.queue),
        ("eta", emission.eta),
        ("countdown", emission.countdown),
        ("listeners", None if emission.listeners is None else list(emission.listeners)),
        ("retries", emission.retries or None),
        ("headers", emission.extra_headers or None),
    ):
        if value is not None:
            fields[key] = value
    return _encode_message(fields).decode()  # msgspec: json.dumps with these options costs ~10x more


_encode_message = msgspec.json.Encoder().encode


def emission_of(event_id: str, emission_id: str, message: str) -> Emission:
    """Rebuild the emission of a row; the body goes out byte for byte as it was emitted."""
    fields = json.loads(message)
    body: str = fields["body"]
    try:
        args, kwargs = json.loads(body)[:2]  # only for the argsrepr/kwargsrepr headers
    except (ValueError, TypeError):
        args, kwargs = (), {}
    listeners = fields.get("listeners")
    return Emission(
        event_id=event_id,
        emission_id=emission_id,
        task_name=fields["task"],
        body=body.encode(),
        args=tuple(args),
        kwargs=dict(kwargs),
        queue=fields.get("queue"),
        emitted_at=fields.get("at", 0.0),
        eta=fields.get("eta"),
        countdown=fields.get("countdown"),
        listeners=None if listeners is None else tuple(listeners),
        retries=fields.get("retries", 0),
        extra_headers=fields.get("headers"),
    )


def outbox_rows(emissions: Sequence[Emission], owner: str, lease_s: float) -> list[dict[str, Any]]:
    now = time.time()
    return [
        {
            "id": e.emission_id,
            "event_id": e.event_id,
            "owner": owner,
            "created_at": now,
            "lease_until": now + lease_s,
            "message": _message(e),
        }
        for e in emissions
    ]


def write_rows(
    conn: Connection | Session, table: Table, emissions: Sequence[Emission], owner: str, lease_s: float
) -> None:
    """One INSERT of ``emissions`` (inside the committing transaction): several as one multi-row INSERT,
    a single row (the common case) as the driver's own SQL, compiled once per table and dialect."""
    rows = outbox_rows(emissions, owner, lease_s)
    if len(rows) > 1:
        conn.execute(insert(table).values(rows))
        return
    connection = conn.connection() if isinstance(conn, Session) else conn
    sql, order = _one_row_insert(table, connection.dialect)
    row = rows[0]
    # exec_driver_sql skips building the statement's cache key and compiled-cache lookup: ~50 us less
    # CPU per commit on asyncpg (bench.outbox), the same statement on the wire.
    connection.exec_driver_sql(sql, row if order is None else tuple(row[name] for name in order))


_one_row_inserts: dict[tuple[int, str, str, str], tuple[Table, str, tuple[str, ...] | None]] = {}


def _one_row_insert(table: Table, dialect: Dialect) -> tuple[str, tuple[str, ...] | None]:
    """``INSERT INTO <table> (...) VALUES (...)`` in ``dialect``'s SQL and parameter style, and the
    order of its parameters when they are positional (``None``: named, a dict is passed)."""
    key = (id(table), dialect.name, dialect.driver, str(dialect.paramstyle))
    cached = _one_row_inserts.get(key)
    if cached is None or cached[0] is not table:  # the table object is kept: its id is not reused
        compiled = insert(table).compile(dialect=dialect)
        order = tuple(compiled.positiontup or ()) if compiled.positional else None
        cached = _one_row_inserts[key] = (table, str(compiled), order)
    return cached[1], cached[2]


def _chunks(ids: Iterable[str]) -> Iterable[list[str]]:
    chunk: list[str] = []
    for emission_id in ids:
        chunk.append(emission_id)
        if len(chunk) == ID_CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@dataclass(frozen=True)
class OutboxStatus:
    depth: int
    oldest_age_s: float | None
    """Age of the oldest row (None when empty)."""
    relay_lag_s: float
    """How long the most overdue row has waited past its lease for a relay (0 when none is overdue)."""
    overdue: int


@dataclass(frozen=True)
class Claimed:
    emission: Emission
    previous_owner: str


class OutboxStore:
    """Deletes, lease renewals, claims and status on the outbox table, through a blocking engine."""

    def __init__(self, engine: Engine, table: Table) -> None:
        self.engine = engine
        self.table = table
        self._skip_locked = engine.dialect.name == "postgresql"
        self._delete_any = table.delete().where(table.c.id == any_(bindparam("ids", type_=ARRAY(String()))))

    @classmethod
    def from_url(cls, url: URL | str, table: Table, timeout_s: float | None = None) -> OutboxStore:
        parsed = sync_url(url)
        options: dict[str, Any] = {"pool_pre_ping": True}
        if parsed.get_backend_name() == "sqlite":
            # Several processes write the file: wait for the lock rather than fail.
            options["connect_args"] = {"timeout": timeout_s or 30.0}
        else:
            options.update(pool_size=2, max_overflow=2)
            if timeout_s is not None and parsed.get_driver_name() in ("psycopg", "psycopg2"):
                options["connect_args"] = {"connect_timeout": max(1, round(timeout_s))}
        return cls(create_engine(parsed, **options), table)

    def check(self) -> None:
        """Raise ``OutboxTableMissingError`` unless the table exists (other database errors propagate)."""
        from sqlalchemy import inspect

        with self.engine.connect() as conn:
            if not inspect(conn).has_table(self.table.name, schema=self.table.schema):
                raise OutboxTableMissingError(self.table.name)

    def delete(self, ids: Collection[str]) -> int:
        deleted = 0
        table = self.table
        with self.engine.begin() as conn:
            if self._skip_locked:  # PostgreSQL: one array parameter, a statement compiled once
                return int(conn.execute(self._delete_any, {"ids": list(ids)}).rowcount)
            for chunk in _chunks(ids):
                deleted += conn.execute(table.delete().where(table.c.id.in_(chunk))).rowcount
        return deleted

    def renew(self, ids: Collection[str], lease_until: float) -> None:
        """Push the lease of rows this process still means to publish (so no relay takes them)."""
        table = self.table
        with self.engine.begin() as conn:
            for chunk in _chunks(ids):
                conn.execute(table.update().where(table.c.id.in_(chunk)).values(lease_until=lease_until))

    def claim(self, owner: str, now: float, lease_until: float, limit: int) -> list[Claimed]:
        """Take up to ``limit`` rows whose lease ran out, oldest first: they become ``owner``'s with a
        fresh lease (if this relay dies too, another one takes them after that)."""
        if self._skip_locked:  # PostgreSQL: one statement, and concurrent relays each take other rows
            return self._claim_skip_locked(owner, now, lease_until, limit)
        table = self.table
        due = (
            select(table.c.id, table.c.event_id, table.c.owner, table.c.message)
            .where(table.c.lease_until < now)
            .order_by(table.c.lease_until)
            .limit(limit)
        )
        with self.engine.begin() as conn:
            rows = conn.execute(due).all()
            taken: set[str] = set()
            for chunk in _chunks(row.id for row in rows):
                # Compare-and-set: the lease must still be lapsed (SQLite has no row locks; another
                # relay that claimed a row meanwhile gave it a fresh lease, so it does not match).
                renewed = conn.execute(
                    table.update()
                    .where(table.c.id.in_(chunk), table.c.lease_until < now)
                    .values(owner=owner, lease_until=lease_until)
                    .returning(table.c.id)
                )
                taken.update(renewed.scalars())
        claimed = [Claimed(emission_of(r.event_id, r.id, r.message), r.owner) for r in rows if r.id in taken]
        claimed.sort(key=lambda c: c.emission.emitted_at)
        return claimed

    def _claim_skip_locked(self, owner: str, now: float, lease_until: float, limit: int) -> list[Claimed]:
        """``UPDATE ... FROM (SELECT ... FOR UPDATE SKIP LOCKED) RETURNING``: one round trip per batch."""
        table = self.table
        due = (
            select(table.c.id, table.c.owner)
            .where(table.c.lease_until < now)
            .order_by(table.c.lease_until)
            .limit(limit)
            .with_for_update(skip_locked=True)
            .cte("due")
        )
        take = (
            table.update()
            .where(table.c.id == due.c.id)
            .values(owner=owner, lease_until=lease_until)
            .returning(table.c.id, table.c.event_id, table.c.message, due.c.owner.label("previous_owner"))
        )
        with self.engine.begin() as conn:
            rows = conn.execute(take).all()
        claimed = [Claimed(emission_of(r.event_id, r.id, r.message), r.previous_owner) for r in rows]
        claimed.sort(key=lambda c: c.emission.emitted_at)
        return claimed

    def status(self, now: float | None = None) -> OutboxStatus:
        table = self.table
        now = time.time() if now is None else now
        with self.engine.connect() as conn:
            depth, oldest = conn.execute(select(func.count(), func.min(table.c.created_at))).one()
            overdue, first_lapsed = conn.execute(
                select(func.count(), func.min(table.c.lease_until)).where(table.c.lease_until < now)
            ).one()
        return OutboxStatus(
            depth=int(depth),
            oldest_age_s=None if oldest is None else max(0.0, now - float(oldest)),
            relay_lag_s=0.0 if first_lapsed is None else max(0.0, now - float(first_lapsed)),
            overdue=int(overdue),
        )

    def close(self) -> None:
        self.engine.dispose()


DATABASE_ERRORS = (SQLAlchemyError, OSError)
