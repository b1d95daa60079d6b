"""Where the state every process of the app must share lives: chosen once, from ``state_url``.

Cancel tombstones and beat's tick claims (brokers other than Redis), the failed-events store and the
completed-listener ledger. In order:

1. ``CeleryEventsConfig(state_url=...)`` (``failed_store_url``, its old name, for one release),
   else env ``CELERY_EVENTS_STATE_URL``:
   ``redis://``/``rediss://``/``sentinel://``, or an SQLAlchemy URL (``postgresql+psycopg://...``,
   ``sqlite:///shared.db``);
2. the broker's Redis when the broker is Redis;
3. the outbox's database when an outbox is configured;
4. SQLite files under ``data_dir``: one machine only (the embedded broker's case).

On a Redis broker, delayed events, their cancels and beat's ticks stay in the broker's Redis
whatever ``state_url`` says: their scripts move messages into the queues in one atomic step.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from litestar_celery_events.brokers import (
    RedisSettings,
    is_embedded_url,
    is_redis_url,
    redact_url,
    redis_settings,
    redis_settings_for_url,
)
from litestar_celery_events.config import STATE_URL_ENV
from litestar_celery_events.errors import StateStoreError

if TYPE_CHECKING:
    from celery import Celery

    from litestar_celery_events.config import CeleryEventsConfig
    from litestar_celery_events.stores.failed import FailedStore
    from litestar_celery_events.stores.ledger import ListenerLedger
    from litestar_celery_events.stores.schedule import ScheduleStore

__all__ = (
    "StateStore",
    "check_state_store",
    "failed_store_for",
    "ledger_for",
    "schedule_store_for",
    "state_store_of",
    "warn_if_not_shared",
)

FAILED_SQLITE_FILE = "failed.sqlite3"
SCHEDULE_SQLITE_FILE = "scheduling.sqlite3"

logger = logging.getLogger("litestar_celery_events")


@dataclass(frozen=True)
class StateStore:
    """One resolved place for the shared state (``kind``), and how to reach it."""

    kind: Literal["redis", "sql", "local"]
    location: str
    """Where, passwords redacted: for logs, warnings and ``events status``."""
    redis: RedisSettings | None = None
    key_prefix: str = ""
    """Before every Redis key: kombu's ``global_keyprefix`` when this is the broker's Redis."""
    sql_url: str | None = field(default=None, repr=False)  # holds the password: never in a repr or a log
    local_dir: Path | None = None

    @property
    def one_machine(self) -> bool:
        """SQLite (under ``data_dir`` or a ``sqlite:///`` URL): only processes of one machine see it."""
        return self.kind == "local" or str(self.sql_url).startswith("sqlite")


def _configured_url(config: CeleryEventsConfig) -> str | None:
    # The config refuses two different ones; the environment comes after both (as for the broker).
    return config.state_url or config.failed_store_url or os.environ.get(STATE_URL_ENV) or None


def state_store_of(config: CeleryEventsConfig, celery_app: Celery) -> StateStore:
    """The state store for ``config``; a URL of an unknown kind raises ``StateStoreError`` naming it."""
    url = _configured_url(config)
    if url is not None:
        return _from_url(url)
    if is_redis_url(str(celery_app.conf.broker_write_url)):
        settings = redis_settings(celery_app)
        return StateStore("redis", settings.location, redis=settings, key_prefix=settings.global_keyprefix)
    if config.outbox is not None:
        database = config.outbox.database_url()
        return StateStore("sql", database.render_as_string(hide_password=True), sql_url=_sql_url(database))
    data_dir = config.resolved_data_dir
    return StateStore("local", f"SQLite under {data_dir}", local_dir=data_dir)


def _sql_url(url: object) -> str:
    render = getattr(url, "render_as_string", None)
    return str(render(hide_password=False)) if render is not None else str(url)


def _from_url(url: str) -> StateStore:
    if is_redis_url(url):
        settings = redis_settings_for_url(url)
        return StateStore("redis", settings.location, redis=settings)
    try:
        from sqlalchemy.engine import make_url
    except ImportError as exc:
        raise StateStoreError(
            f"state_url={redact_url(url)!r} is an SQL database, which needs SQLAlchemy and the database's driver: "
            "pip install 'litestar-celery-events[sql]'"
        ) from exc
    try:
        parsed = make_url(url)
        parsed.get_dialect()  # an unknown scheme fails here, not at the first failure recorded
    except Exception as exc:
        raise StateStoreError(
            f"state_url={redact_url(url)!r} is neither a Redis URL (redis://, rediss://, sentinel://) "
            "nor an SQLAlchemy database URL (postgresql+psycopg://..., sqlite:///path)"
        ) from exc
    if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise StateStoreError(
            f"state_url={redact_url(url)!r} is an in-memory SQLite database, which no other process sees; "
            "give a file (sqlite:///path/state.db) or a server database"
        )
    return StateStore("sql", parsed.render_as_string(hide_password=True), sql_url=url)


_warned = False  # once per process, and not again in its forked children (the worker's pool)


def warn_if_not_shared(config: CeleryEventsConfig, celery_app: Celery, role: str) -> StateStore:
    """Warn (once per process) when a broker other hosts can reach is paired with a store they cannot."""
    global _warned
    state = state_store_of(config, celery_app)
    if state.one_machine and not is_embedded_url(celery_app.conf.broker_url) and not _warned:
        _warned = True
        logger.warning(
            "%s: the broker %s can serve several hosts, but cancels, beat's tick claims and failed events are kept "
            "in %s, which only this machine sees: a cancel made on another host does not stop a worker here, "
            "and beat on two hosts fires each tick twice. Set CeleryEventsConfig(state_url=...) to a store every "
            "host reaches (the broker's Redis, a redis:// URL or a database such as postgresql+psycopg://...)",
            role,
            redact_url(str(celery_app.conf.broker_url)),
            state.location,
        )
    return state


def failed_store_for(config: CeleryEventsConfig, celery_app: Celery, timeout_s: float | None = None) -> FailedStore:
    """The failed-events store in the state store; ``timeout_s`` bounds each call (``events status``)."""
    from litestar_celery_events.stores.failed import RedisFailedStore, SqliteFailedStore

    state = state_store_of(config, celery_app)
    if state.redis is not None:
        return RedisFailedStore(state.redis.open(timeout_s), f"{state.key_prefix}{config.task_name_prefix}:failed")
    if state.sql_url is not None:
        from litestar_celery_events.stores.sql_state import SqlFailedStore, SqlState

        return SqlFailedStore(SqlState(state.sql_url, timeout_s))
    assert state.local_dir is not None
    return SqliteFailedStore(state.local_dir / FAILED_SQLITE_FILE)


def schedule_store_for(state: StateStore, celery_app: Celery, timeout_s: float | None = None) -> ScheduleStore:
    """Delayed events and beat's ticks: in the broker's Redis on Redis brokers, else cancels and ticks
    in the state store (``ArrivalCheckedStore``) while the broker carries the delay."""
    from litestar_celery_events.stores import schedule

    if is_redis_url(str(celery_app.conf.broker_write_url)):
        return schedule.RedisScheduleStore(redis_settings(celery_app).open(timeout_s))  # connects as Celery does
    if state.redis is not None:
        return schedule.RedisFateStore(state.redis.open(timeout_s), state.key_prefix)
    if state.sql_url is not None:
        from litestar_celery_events.stores.sql_state import SqlScheduleStore, SqlState

        return SqlScheduleStore(SqlState(state.sql_url, timeout_s))
    assert state.local_dir is not None
    return schedule.SqliteScheduleStore(state.local_dir / SCHEDULE_SQLITE_FILE)


def ledger_for(config: CeleryEventsConfig, celery_app: Celery) -> ListenerLedger:
    """The completed-listener ledger in the state store (SQLite under ``data_dir`` is refused: one machine)."""
    state = state_store_of(config, celery_app)
    retention_s = config.listener_ledger_retention_s
    if state.redis is not None:
        from litestar_celery_events.stores.ledger import RedisListenerLedger

        namespace = f"{state.key_prefix}{config.task_name_prefix}:done"
        return RedisListenerLedger(state.redis.open(), namespace, retention_s)
    if state.sql_url is not None:
        from litestar_celery_events.stores.ledger import SqlListenerLedger
        from litestar_celery_events.stores.sql_state import SqlState

        sql = SqlState(state.sql_url)
        return SqlListenerLedger(sql.engine, sql.ledger, retention_s)
    raise StateStoreError(
        "listener_ledger=True needs a state store every worker shares: a Redis broker, "
        "CeleryEventsConfig(state_url=...) or an outbox (CeleryEventsConfig(outbox=SQLAlchemyOutbox(...)))"
    )


def check_state_store(config: CeleryEventsConfig, celery_app: Celery, role: str, timeout_s: float = 5.0) -> StateStore:
    """At start-up: warn if the state store is one machine's; reach a configured ``state_url`` now, or
    raise naming it. (The broker's Redis is left to Celery, which retries it; the outbox's database to
    the outbox's own start-up check.)"""
    state = warn_if_not_shared(config, celery_app, role)
    if _configured_url(config) is None:
        return state
    store = failed_store_for(config, celery_app, timeout_s)
    try:
        store.count()
    except Exception as exc:
        raise StateStoreError(
            f"{role}: the state store {state.location} (CeleryEventsConfig.state_url) cannot be reached: "
            f"{redact_url(f'{type(exc).__name__}: {exc}')}"
        ) from exc
    finally:
        store.close()
    return state
