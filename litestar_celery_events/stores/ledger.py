"""The ledger of completed listener runs: (emission id, listener) pairs, kept for a retention window.

With the outbox an emission can reach the broker twice (the publish right after the commit and a
relay that took the row after its lease, or a publish retried after a lost acknowledgement), and
any broker redelivers a message whose worker died before acknowledging it. The worker looks up the
listeners that already completed for an emission and skips them, so a listener that finished does
not run again. A listener that was killed mid-run has no entry and runs again: at-least-once.

Redis (the broker's, one SET per emission with a TTL) or SQL (the outbox database, a table).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Protocol

from sqlalchemy import Column, Float, MetaData, PrimaryKeyConstraint, String, Table, delete, insert, select
from sqlalchemy.exc import IntegrityError

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from litestar_celery_events.brokers import BrokerRedis

__all__ = (
    "DEFAULT_LEDGER_TABLE",
    "ListenerLedger",
    "RedisListenerLedger",
    "SqlListenerLedger",
    "ledger_table",
)

DEFAULT_LEDGER_TABLE = "celery_events_ledger"
PRUNE_EVERY_S = 60.0


class ListenerLedger(Protocol):
    location: str

    def completed(self, emission_id: str) -> set[str]:
        """Names of the listeners that completed for ``emission_id`` within the retention window."""

    def record(self, emission_id: str, listener: str) -> None:
        """``listener`` completed for ``emission_id``."""

    def close(self) -> None: ...


class RedisListenerLedger:
    """One SET per emission (``<namespace>:<emission id>``) that expires after the retention window."""

    def __init__(self, redis: BrokerRedis, namespace: str, retention_s: float) -> None:
        self._client = redis.client  # the factory's handle: TLS, Sentinel, failover and the fork rule
        self._handle = redis
        self._namespace = namespace
        self._retention_ms = max(1, int(retention_s * 1000))
        self.location = f"{redis.location} keys {namespace}:*"

    def completed(self, emission_id: str) -> set[str]:
        members = self._client().smembers(f"{self._namespace}:{emission_id}")
        return {m.decode() if isinstance(m, bytes) else str(m) for m in members}

    def record(self, emission_id: str, listener: str) -> None:
        key = f"{self._namespace}:{emission_id}"
        pipe = self._client().pipeline(transaction=False)
        pipe.sadd(key, listener)
        pipe.pexpire(key, self._retention_ms)
        pipe.execute()

    def close(self) -> None:
        self._handle.close()


def ledger_table(metadata: MetaData, name: str = DEFAULT_LEDGER_TABLE) -> Table:
    """The ledger's table on ``metadata`` (next to the outbox table, for ``create_all`` and Alembic)."""
    existing = metadata.tables.get(name)
    if existing is not None:
        return existing
    return Table(
        name,
        metadata,
        Column("emission_id", String(64), nullable=False),
        Column("listener", String(300), nullable=False),
        Column("completed_at", Float, nullable=False, index=True),
        PrimaryKeyConstraint("emission_id", "listener"),
    )


class SqlListenerLedger:
    """Rows in the outbox database; entries older than the retention window are pruned now and then."""

    def __init__(self, engine: Engine, table: Table, retention_s: float) -> None:
        self._engine = engine
        self._table = table
        self._retention_s = retention_s
        self._next_prune = 0.0
        self.location = f"{engine.url.render_as_string(hide_password=True)} table {table.name}"

    def completed(self, emission_id: str) -> set[str]:
        table = self._table
        since = time.time() - self._retention_s
        query = select(table.c.listener).where(table.c.emission_id == emission_id, table.c.completed_at >= since)
        with self._engine.connect() as conn:
            return set(conn.execute(query).scalars())

    def record(self, emission_id: str, listener: str) -> None:
        now = time.time()
        table = self._table
        try:
            with self._engine.begin() as conn:
                conn.execute(insert(table).values(emission_id=emission_id, listener=listener, completed_at=now))
        except IntegrityError:  # completed before (a duplicate that raced this one): already recorded
            pass
        if now >= self._next_prune:
            self._next_prune = now + PRUNE_EVERY_S
            with self._engine.begin() as conn:
                conn.execute(delete(table).where(table.c.completed_at < now - self._retention_s))

    def close(self) -> None:
        self._engine.dispose()
