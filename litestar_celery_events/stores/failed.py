"""The failed-events store: where a listener run that will not succeed ends, visible and replayable.

A record is written once a listener has exhausted its retries, or at once for errors no retry can
fix (the listener cannot take the emitted arguments, the message names an unregistered task or
listener, the payload cannot be decoded). One record per (emission, listener): recording the same
failure again (a redelivery, a replay that fails again) overwrites it instead of adding a copy.

Backends, picked by ``stores.state.failed_store_for`` from the state store (``state_url``):

- the broker's Redis when the broker is Redis: a hash ``<prefix>:failed`` (id -> JSON record) and a
  sorted set ``<prefix>:failed:index`` (id by failure time), so every worker and the CLI share it;
- an SQL database (``stores.sql_state``): ``state_url`` or the outbox's database;
- otherwise SQLite at ``<data_dir>/failed.sqlite3``: shared by the processes of one machine (the
  embedded broker).
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

from kombu.utils import json as kombu_json

if TYPE_CHECKING:
    from collections.abc import Iterable

    from litestar_celery_events.brokers import BrokerRedis
    from litestar_celery_events.contract.failures import ListenerFailure

__all__ = (
    "FailedStore",
    "RedisFailedStore",
    "SqliteFailedStore",
    "dumps_record",
    "failure_record",
    "loads_record",
    "matches",
    "record_id",
)

SQLITE_FILE = "failed.sqlite3"
SQLITE_BUSY_TIMEOUT_S = 30.0


def record_id(emission_id: str, listener: str) -> str:
    """A short, stable id per (emission, listener): the same failure recorded twice is one record."""
    return hashlib.sha1(f"{emission_id}\0{listener}".encode(), usedforsecurity=False).hexdigest()[:16]


def failure_record(failure: ListenerFailure) -> dict[str, Any]:
    return {"id": record_id(failure.emission_id, failure.listener), **failure.as_dict()}


def dumps_record(record: dict[str, Any]) -> str:
    """kombu's JSON: the arguments keep their types (datetime, UUID, Decimal, bytes) for a replay."""
    return str(kombu_json.dumps(record, ensure_ascii=False))


def loads_record(raw: str | bytes) -> dict[str, Any]:
    return dict(kombu_json.loads(raw))


def matches(record: dict[str, Any], event_id: str | None, listener: str | None) -> bool:
    name = str(record.get("listener", ""))
    return (event_id is None or record.get("event_id") == event_id) and (
        listener is None or name == listener or name.endswith(f".{listener}")
    )


class FailedStore(Protocol):
    """What the worker writes to and the CLI reads from."""

    location: str
    """Where the records live (passwords redacted), for logs and ``events status``."""

    def add(self, failure: ListenerFailure) -> str:
        """Record ``failure``; return its id."""

    def records(self, event_id: str | None = None, listener: str | None = None) -> list[dict[str, Any]]:
        """Records, oldest failure first, filtered by event id and listener (full or short name)."""

    def get(self, record_id: str) -> dict[str, Any] | None: ...

    def delete(self, record_ids: Iterable[str]) -> int:
        """Remove these records; return how many existed."""

    def purge(self) -> int:
        """Remove every record; return how many there were."""

    def count(self) -> int: ...

    def close(self) -> None: ...


class RedisFailedStore:
    """Records in the broker's Redis: a hash of JSON records and a sorted index by failure time."""

    def __init__(self, redis: BrokerRedis, namespace: str) -> None:
        self._redis = redis.client  # the factory's handle: TLS, Sentinel, failover and the fork rule
        self._handle = redis
        self.location = f"{redis.location} key {namespace}"
        self._hash = namespace
        self._index = f"{namespace}:index"

    def add(self, failure: ListenerFailure) -> str:
        record = failure_record(failure)
        pipe = self._redis().pipeline(transaction=True)
        pipe.hset(self._hash, record["id"], dumps_record(record))
        pipe.zadd(self._index, {record["id"]: record["failed_at"]})
        pipe.execute()
        return str(record["id"])

    def records(self, event_id: str | None = None, listener: str | None = None) -> list[dict[str, Any]]:
        client = self._redis()
        ids = cast("list[bytes]", client.zrange(self._index, 0, -1))
        if not ids:
            return []
        found = [loads_record(raw) for raw in client.hmget(self._hash, ids) if raw is not None]
        return [r for r in found if matches(r, event_id, listener)]

    def get(self, record_id: str) -> dict[str, Any] | None:
        raw = self._redis().hget(self._hash, record_id)
        return None if raw is None else loads_record(raw)

    def delete(self, record_ids: Iterable[str]) -> int:
        ids = list(record_ids)
        if not ids:
            return 0
        pipe = self._redis().pipeline(transaction=True)
        pipe.hdel(self._hash, *ids)
        pipe.zrem(self._index, *ids)
        removed, _ = pipe.execute()
        return int(removed)

    def purge(self) -> int:
        pipe = self._redis().pipeline(transaction=True)
        pipe.hlen(self._hash)
        pipe.delete(self._hash, self._index)
        count, _ = pipe.execute()
        return int(count)

    def count(self) -> int:
        return int(self._redis().hlen(self._hash))

    def close(self) -> None:
        self._handle.close()


class SqliteFailedStore:
    """Records in a SQLite file: shared by the workers and the CLI of one machine."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.location = str(path)
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None
        self._pid = -1

    def _db(self) -> sqlite3.Connection:
        if self._connection is None or self._pid != os.getpid():  # a forked child opens its own
            self.path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(
                self.path, timeout=SQLITE_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute(
                "CREATE TABLE IF NOT EXISTS failed ("
                "id TEXT PRIMARY KEY, event_id TEXT NOT NULL, listener TEXT NOT NULL, "
                "failed_at REAL NOT NULL, record TEXT NOT NULL)"
            )
            self._connection = connection
            self._pid = os.getpid()
        return self._connection

    def add(self, failure: ListenerFailure) -> str:
        record = failure_record(failure)
        with self._lock:
            self._db().execute(
                "INSERT OR REPLACE INTO failed (id, event_id, listener, failed_at, record) VALUES (?, ?, ?, ?, ?)",
                (record["id"], record["event_id"], record["listener"], record["failed_at"], dumps_record(record)),
            )
        return str(record["id"])

    def records(self, event_id: str | None = None, listener: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db().execute("SELECT record FROM failed ORDER BY failed_at, id").fetchall()
        return [r for r in (loads_record(row[0]) for row in rows) if matches(r, event_id, listener)]

    def get(self, record_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db().execute("SELECT record FROM failed WHERE id = ?", (record_id,)).fetchone()
        return None if row is None else dict(loads_record(row[0]))

    def delete(self, record_ids: Iterable[str]) -> int:
        with self._lock:
            db = self._db()
            return sum(db.execute("DELETE FROM failed WHERE id = ?", (rid,)).rowcount for rid in record_ids)

    def purge(self) -> int:
        with self._lock:
            return int(self._db().execute("DELETE FROM failed").rowcount)

    def count(self) -> int:
        with self._lock:
            return int(self._db().execute("SELECT COUNT(*) FROM failed").fetchone()[0])

    def close(self) -> None:
        if self._connection is not None and self._pid == os.getpid():
            self._connection.close()
        self._connection = None
