"""Where delayed events wait and where beat records the ticks it fired.

Redis brokers: a sorted set scored by due time plus a hash ``emission id -> prepared message``
(the exact kombu envelope, without an ``eta``). Lua scripts make each step atomic, so any number
of movers (one per worker main process, one per beat) enqueue each due event exactly once, and a
cancel either removes the event or finds it already moved. Workers never see an undue event.

Other brokers: the broker carries the delay (RabbitMQ's delay levels; Celery's ETA on the
embedded broker) and the state store (``state_url``: a Redis, an SQL database, else a SQLite file
under ``data_dir``) keeps the cancel set and beat's ticks; the event task asks it when a delayed
emission arrives (``ArrivalCheckedStore.may_run``).
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import redis

from litestar_celery_events.brokers import MAX_AMQP_DELAY_S
from litestar_celery_events.brokers.failover import failover_hazard
from litestar_celery_events.stores.lua import lua_script

if TYPE_CHECKING:
    from redis.client import Pipeline

    from litestar_celery_events.brokers import BrokerRedis

__all__ = (
    "CANCEL_MEMORY_S",
    "RedisClusterUnsupportedError",
    "ArrivalCheckedStore",
    "RedisFateStore",
    "RedisScheduleStore",
    "ScheduleStore",
    "SqliteScheduleStore",
    "due_timestamp",
    "eta_of",
    "redis_keys",
    "stage_delayed",
)

KEY_NAMESPACE = "celery-events"
CANCEL_MEMORY_S = 7 * 24 * 3600
"""How long a cancel is remembered for an emission that a publisher has not written yet."""


class RedisClusterUnsupportedError(RuntimeError):
    """The broker's Redis is a Redis Cluster node: the store's scripts need one server (a start-up error)."""


def eta_of(due_ts: float) -> str:
    """Celery's ``eta`` header (ISO 8601, UTC) for a due time given as a Unix timestamp."""
    return datetime.fromtimestamp(due_ts, tz=timezone.utc).isoformat()


def due_timestamp(eta: str) -> float:
    return datetime.fromisoformat(eta).timestamp()


def redis_keys(global_keyprefix: str = "") -> tuple[str, str, str, str]:
    """(due sorted set, messages hash, cancel tombstone prefix, beat ticks hash), after kombu's prefix."""
    base = f"{global_keyprefix}{KEY_NAMESPACE}"
    return f"{base}:delayed", f"{base}:delayed:messages", f"{base}:cancelled:", f"{base}:beat:ticks"


def stage_delayed(
    pipe: Pipeline, global_keyprefix: str, emission_id: str, due_ts: float, list_key: str, envelope: str
) -> None:
    """Queue on ``pipe`` the write of one delayed message into the store (skipped if already cancelled)."""
    zset, messages, tombstones, _ = redis_keys(global_keyprefix)
    lua_script(pipe, "stage_delayed")(
        keys=[zset, messages, tombstones + emission_id],
        args=[emission_id, repr(due_ts), f"{list_key}\n{envelope}"],
        client=pipe,
    )


class ScheduleStore(Protocol):
    """What ``cancel_scheduled`` and beat need from the broker side."""

    def cancel(self, emission_id: str, due_ts: float | None = None) -> bool:
        """Make sure ``emission_id`` (due at ``due_ts``, if known) never runs; True if it was waiting and now is not."""

    def claim_tick(self, name: str, slot: float) -> bool:
        """True for the first caller claiming tick ``slot`` (a Unix timestamp) of schedule ``name``."""

    def last_tick(self, name: str) -> float | None:
        """The latest tick claimed for ``name``, if any."""

    def close(self) -> None: ...


class ArrivalCheckedStore(ScheduleStore, Protocol):
    """For brokers that carry the delay: cancel and the event task's ``may_run`` exclude each other."""

    def may_run(self, emission_id: str) -> bool:
        """Called by the event task of a delayed emission: False if it was cancelled."""


class RedisScheduleStore:
    """The Redis side: due sorted set, prepared messages, cancel tombstones, beat ticks."""

    def __init__(self, redis: BrokerRedis) -> None:
        self.zset, self.messages, self._tombstones, self.ticks = redis_keys(redis.settings.global_keyprefix)
        self._redis = redis  # the factory's handle: TLS, Sentinel, failover and the fork rule

    @property
    def client(self) -> redis.Redis:
        return self._redis.client()

    def check_single_server(self) -> None:
        """Refuse Redis Cluster: the scripts touch the store's keys and the queues' lists in one call,
        which a cluster spreads over slots (CROSSSLOT) - half-working at best, so not at all."""
        try:
            cluster = self.client.info("cluster")
        except redis.ResponseError:  # INFO renamed or refused (some managed Redis): cannot tell
            return
        if int(cluster.get("cluster_enabled", 0)):
            raise RedisClusterUnsupportedError(
                "the broker's Redis is a Redis Cluster node: delayed events and beat's ticks need one Redis server "
                "(their Lua scripts touch several keys, and kombu's Redis transport has no cluster support either); "
                "use a single Redis server, with Sentinel for failover"
            )

    def failover_hazard(self) -> str | None:
        """Through Sentinel: why a failover could lose or double delayed events and ticks (or None)."""
        return failover_hazard(self.client) if self._redis.sentinel else None

    def cancel(self, emission_id: str, due_ts: float | None = None) -> bool:
        keys = [self.zset, self.messages, self._tombstones + emission_id]
        return bool(
            lua_script(self.client, "cancel")(keys=keys, args=[emission_id, CANCEL_MEMORY_S], client=self.client)
        )

    def was_cancelled(self, emission_id: str) -> bool:
        """True if ``cancel`` was called for ``emission_id`` (its tombstone lasts ``CANCEL_MEMORY_S``)."""
        return bool(self.client.exists(self._tombstones + emission_id))

    def move_due(self, now: float, limit: int = 1000) -> tuple[int, float | None]:
        """Enqueue up to ``limit`` events due by ``now``; return (how many, next due time or None)."""
        reply = lua_script(self.client, "move_due")(
            keys=[self.zset, self.messages], args=[repr(now), limit], client=self.client
        )
        # Lua drops a trailing nil: an empty store answers {moved} alone.
        return int(reply[0]), float(reply[1]) if len(reply) > 1 else None

    def fire_tick(self, name: str, slot: float, list_key: str, envelope: str) -> bool:
        """Claim tick ``slot`` of ``name`` and enqueue its message in one step; False if already fired."""
        return bool(
            lua_script(self.client, "fire_tick")(
                keys=[self.ticks, list_key], args=[name, repr(slot), envelope], client=self.client
            )
        )

    def claim_tick(self, name: str, slot: float) -> bool:
        return bool(
            lua_script(self.client, "claim_tick")(keys=[self.ticks], args=[name, repr(slot)], client=self.client)
        )

    def last_tick(self, name: str) -> float | None:
        value = self.client.hget(self.ticks, name)
        return None if value is None else float(value)

    def waiting(self) -> int:
        """How many delayed events wait in the store."""
        return int(self.client.zcard(self.zset))

    def next_due(self) -> float | None:
        """Due time of the earliest waiting event."""
        first = self.client.zrange(self.zset, 0, 0, withscores=True)
        return float(first[0][1]) if first else None

    def close(self) -> None:
        self._redis.close()


class SqliteScheduleStore:
    """The fallback for brokers without a store: a cancel set and beat's ticks in one SQLite file.

    The delay itself rides on the broker. The event task asks ``may_run`` before running a
    delayed emission; ``cancel`` and ``may_run`` exclude each other in one transaction, so a
    cancel that returns True means the listeners never run, also after any restart. A cancel is
    kept until ``CANCEL_MEMORY_S`` after the emission was due (or, due time unknown, after the
    longest delay a broker holds), and for ``CANCEL_MEMORY_S`` after the event task first met it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            # forget_after: delays up to years on RabbitMQ; a cancel must outlive its emission's due time.
            db.execute("CREATE TABLE IF NOT EXISTS cancels (id TEXT PRIMARY KEY, forget_after REAL NOT NULL)")
            if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'cancelled'").fetchone():  # the old cancel set
                db.execute("INSERT OR IGNORE INTO cancels SELECT id, at + ? FROM cancelled", (CANCEL_MEMORY_S,))
                db.execute("DROP TABLE cancelled")
            db.execute("CREATE TABLE IF NOT EXISTS dispatched (id TEXT PRIMARY KEY, at REAL NOT NULL)")
            db.execute("CREATE TABLE IF NOT EXISTS ticks (name TEXT PRIMARY KEY, slot REAL NOT NULL)")

    def _connect(self) -> contextlib.closing[sqlite3.Connection]:
        return contextlib.closing(sqlite3.connect(self.path, timeout=30, isolation_level=None))

    def _in_transaction(self, statements: Any) -> Any:
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                result = statements(db)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return result

    def cancel(self, emission_id: str, due_ts: float | None = None) -> bool:
        now = time.time()
        forget_after = (now + MAX_AMQP_DELAY_S if due_ts is None else max(now, due_ts)) + CANCEL_MEMORY_S

        def run(db: sqlite3.Connection) -> bool:
            if db.execute("SELECT 1 FROM dispatched WHERE id = ?", (emission_id,)).fetchone():
                return False
            db.execute("INSERT OR IGNORE INTO cancels VALUES (?, ?)", (emission_id, forget_after))
            db.execute("DELETE FROM cancels WHERE forget_after < ?", (now,))
            return True

        return bool(self._in_transaction(run))

    def may_run(self, emission_id: str) -> bool:
        """Called by the event task of a delayed emission: False if it was cancelled."""

        def run(db: sqlite3.Connection) -> bool:
            if db.execute("SELECT 1 FROM cancels WHERE id = ?", (emission_id,)).fetchone():
                # Met once: kept CANCEL_MEMORY_S more for redeliveries of the same message.
                db.execute(
                    "UPDATE cancels SET forget_after = MIN(forget_after, ?) WHERE id = ?",
                    (time.time() + CANCEL_MEMORY_S, emission_id),
                )
                return False
            db.execute("INSERT OR IGNORE INTO dispatched VALUES (?, ?)", (emission_id, time.time()))
            db.execute("DELETE FROM dispatched WHERE at < ?", (time.time() - CANCEL_MEMORY_S,))
            return True

        return bool(self._in_transaction(run))

    def claim_tick(self, name: str, slot: float) -> bool:
        def run(db: sqlite3.Connection) -> bool:
            row = db.execute("SELECT slot FROM ticks WHERE name = ?", (name,)).fetchone()
            if row is not None and slot <= row[0]:
                return False
            db.execute("INSERT OR REPLACE INTO ticks VALUES (?, ?)", (name, slot))
            return True

        return bool(self._in_transaction(run))

    def last_tick(self, name: str) -> float | None:
        with self._connect() as db:
            row = db.execute("SELECT slot FROM ticks WHERE name = ?", (name,)).fetchone()
        return None if row is None else float(row[0])

    def close(self) -> None:
        """Nothing held open: each call opens and closes its own connection."""


class RedisFateStore:
    """Cancels and beat's ticks in a Redis that is not the broker (``state_url=redis://...``).

    One key per delayed emission holds its fate, ``cancelled`` or ``dispatched``: ``SET NX`` lets the
    first of ``cancel`` and ``may_run`` decide it, for every host at once.
    """

    def __init__(self, redis: BrokerRedis, key_prefix: str = "") -> None:
        self._redis = redis
        base = f"{key_prefix}{KEY_NAMESPACE}"
        self._fates = f"{base}:fate:"
        self.ticks = f"{base}:beat:ticks"
        self.location = redis.location

    def _decide(self, emission_id: str, fate: bytes, ttl_s: float) -> bool:
        pipe = self._redis.client().pipeline(transaction=True)
        pipe.set(self._fates + emission_id, fate, nx=True, ex=max(1, int(ttl_s)))
        pipe.get(self._fates + emission_id)
        return bool(pipe.execute()[1] == fate)

    def cancel(self, emission_id: str, due_ts: float | None = None) -> bool:
        now = time.time()
        forget_after = (now + MAX_AMQP_DELAY_S if due_ts is None else max(now, due_ts)) + CANCEL_MEMORY_S
        return self._decide(emission_id, b"cancelled", forget_after - now)

    def may_run(self, emission_id: str) -> bool:
        return self._decide(emission_id, b"dispatched", CANCEL_MEMORY_S)

    def claim_tick(self, name: str, slot: float) -> bool:
        client = self._redis.client()
        return bool(lua_script(client, "claim_tick")(keys=[self.ticks], args=[name, repr(slot)], client=client))

    def last_tick(self, name: str) -> float | None:
        value = self._redis.client().hget(self.ticks, name)
        return None if value is None else float(value)

    def close(self) -> None:
        self._redis.close()
