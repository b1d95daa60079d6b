"""Events that follow the database transaction: ``CeleryEventsConfig(outbox=SQLAlchemyOutbox(alchemy))``.

In a request whose advanced-alchemy session has a transaction open, ``emit``/``emit_later`` do not
publish: the session holds the emission. When it commits, the held emissions are written as outbox
rows inside that transaction (one INSERT, SQLAlchemy's ``before_commit``), then handed to the
publisher from memory (``after_commit``); a rollback or a failed commit drops them. The rows are the
copy that survives a crash: the relay (``outbox.relay``) deletes them once published and publishes those a dead
process left.

How ``emit`` finds the request's session without an argument: a tiny ASGI middleware puts the
request's scope in a ``ContextVar``; advanced-alchemy keeps the session it provides in that scope.
Outside a request, ``with outbox.bind(session):`` (or ``async with``) binds emits to a session.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import anyio
from advanced_alchemy.extensions.litestar._utils import get_aa_scope_state
from sqlalchemy import event
from sqlalchemy.orm import Session

from litestar_celery_events.brokers import redact_url
from litestar_celery_events.errors import EventBufferFullError, OutboxConfigError
from litestar_celery_events.outbox.relay import OutboxRelay
from litestar_celery_events.stores.outbox import (
    DATABASE_ERRORS,
    DEFAULT_OUTBOX_TABLE,
    OutboxStore,
    OutboxTableMissingError,
    outbox_table,
    sync_url,
    write_rows,
)
from litestar_celery_events.stores.sql_state import state_tables

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import TracebackType

    from litestar import Litestar
    from litestar.types import ASGIApp, Receive, Scope, Send
    from sqlalchemy.engine import URL
    from sqlalchemy.orm import SessionTransaction

    from litestar_celery_events.config import CeleryEventsConfig
    from litestar_celery_events.contract.message import Emission
    from litestar_celery_events.transports import Transport

__all__ = (
    "SQLAlchemyOutbox",
    "SessionBinding",
    "TransactionalOutbox",
    "remember_request_scope",
    "start_outbox",
    "stop_outbox",
)

logger = logging.getLogger("litestar_celery_events.outbox")

HELD_KEY = "litestar_celery_events.held"
"""Key in ``Session.info`` of the emissions the session's transaction holds."""

_request_scope: ContextVar[Scope | None] = ContextVar("litestar_celery_events_scope", default=None)
_bound_session: ContextVar[Session | None] = ContextVar("litestar_celery_events_session", default=None)


class SQLAlchemyOutbox:
    """The transactional outbox on an advanced-alchemy config (async or sync) that is in the app.

    The table (``celery_events_outbox``) joins advanced-alchemy's metadata for the config's
    ``bind_key``: ``create_all=True`` creates it and Alembic's autogenerate sees it.
    """

    def __init__(self, alchemy: Any, *, table_name: str = DEFAULT_OUTBOX_TABLE, relay_batch_size: int = 1000) -> None:
        from advanced_alchemy.base import metadata_registry

        if relay_batch_size < 1:
            raise ValueError("relay_batch_size must be at least 1")
        self.alchemy = alchemy
        metadata = metadata_registry.get(alchemy.bind_key)
        self.table = outbox_table(metadata, table_name)
        state_tables(metadata)  # the shared state's home when the broker is not Redis (Alembic sees them)
        self.relay_batch_size = relay_batch_size

    def database_url(self) -> URL:
        """The config's database, through a blocking driver (for the relay thread and the CLI)."""
        url = self.alchemy.connection_string or self.alchemy.get_engine().url
        return sync_url(url)

    def open_store(self, timeout_s: float | None = None) -> OutboxStore:
        """The table's SQL through a small blocking engine of its own (the relay's, the CLI's)."""
        return OutboxStore.from_url(self.database_url(), self.table, timeout_s)

    def bind(self, session_or_transaction: Any) -> SessionBinding:
        """``with outbox.bind(session):`` (or ``async with``): emits in the block follow ``session``'s
        transaction, outside a request too (a service, a script, a listener). Sync or async session,
        or a transaction from ``session.begin()``."""
        return SessionBinding(session_or_transaction)

    def attach(
        self,
        config: CeleryEventsConfig,
        submit: Callable[[Emission], None],
        open_transport: Callable[[], Transport],
        on_refused: Callable[[Emission, str], None],
        write_now: Callable[[], None],
    ) -> TransactionalOutbox:
        """The outbox of one emitter: ``submit`` hands an emission to its publisher, ``write_now`` asks it
        to write what it holds without waiting (after a commit); the relay publishes through
        ``open_transport()`` and hands a message the broker refuses to ``on_refused``."""
        relay = OutboxRelay(self.open_store, self.relay_batch_size, config, open_transport, on_refused)
        return TransactionalOutbox(self, submit, relay, write_now)


def _sync_session(target: Any) -> Session:
    session = getattr(target, "sync_session", target)  # AsyncSession -> Session
    if not isinstance(session, Session):
        session = getattr(target, "session", None)  # SessionTransaction / AsyncSessionTransaction
        session = getattr(session, "sync_session", session)
    if not isinstance(session, Session):
        raise TypeError(f"outbox.bind() takes a SQLAlchemy session or session transaction, not {type(target).__name__}")
    return session


class SessionBinding:
    """Binds emits in a ``with``/``async with`` block to a session's transaction."""

    def __init__(self, target: Any) -> None:
        self.session = _sync_session(target)
        self._token: Any = None

    def __enter__(self) -> Session:
        self._token = _bound_session.set(self.session)
        return self.session

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        _bound_session.reset(self._token)
        held: _Held | None = self.session.info.get(HELD_KEY)
        if held is not None and held.emissions and not self.session.in_transaction():
            # Held by a session that never began a transaction: nothing can commit them now.
            self.session.info.pop(HELD_KEY, None)
            held.outbox.drop(held, "the bound session never began a transaction")

    async def __aenter__(self) -> Session:
        return self.__enter__()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.__exit__(exc_type, exc, tb)


class _Held:
    __slots__ = ("emissions", "outbox", "written")

    def __init__(self, outbox: TransactionalOutbox) -> None:
        self.outbox = outbox
        self.emissions: list[Emission] = []
        self.written = False


class TransactionalOutbox:
    """The outbox of one emitter: holds emissions in sessions, writes, hands over and drops them."""

    def __init__(
        self,
        outbox: SQLAlchemyOutbox,
        submit: Callable[[Emission], None],
        relay: OutboxRelay,
        write_now: Callable[[], None],
    ) -> None:
        self.outbox = outbox
        self.table = outbox.table
        self._submit = submit
        self._write_now = write_now
        self.relays_orphans = True
        """Whether this process also relays rows a dead process left (a worker's pool children leave
        that to their main process: one relay per worker, not one per child)."""
        self._scope_key: str = outbox.alchemy.session_scope_key
        self.relay = relay
        self.dropped = 0
        _listen_to_sessions()

    def hold(self, emission: Emission) -> bool:
        """Held by the current transaction (True), or to publish now (False: no transaction open)."""
        session = _bound_session.get()
        if session is None:
            scope = _request_scope.get()
            if scope is None:
                return False
            provided = get_aa_scope_state(scope, self._scope_key)
            if provided is None or not provided.in_transaction():
                return False
            session = getattr(provided, "sync_session", provided)
        info = session.info
        held = info.get(HELD_KEY)
        if held is None:
            held = info[HELD_KEY] = _Held(self)
        held.emissions.append(emission)
        return True

    def write(self, session: Session, held: _Held) -> None:
        """``before_commit``: the held emissions become rows in the committing transaction."""
        self.relay.ensure_started()  # the owner id of this process (again after a fork)
        # The Core connection of the committing transaction: no ORM execution path (~25 us less per commit).
        connection = session.connection(bind_arguments={"clause": self.table})
        write_rows(connection, self.table, held.emissions, self.relay.owner, self.relay.lease_s)
        held.written = True

    def committed(self, emissions: list[Emission]) -> None:
        """``after_commit``: publish from memory now; the rows are deleted once that went out."""
        relay = self.relay
        relay.track(emissions)
        submit = self._submit
        for index, emission in enumerate(emissions):
            try:
                submit(emission)
            except EventBufferFullError as exc:
                relay.untrack(emissions[index:])
                logger.error(
                    "%s; %d committed event(s) wait in the outbox table and a relay publishes them after "
                    "outbox_relay_after_s",
                    exc,
                    len(emissions) - index,
                )
                return
        try:
            self._write_now()  # committed events are late already: not after the rest of the request
        except Exception:  # the commit went through: the loop's next iteration writes them as usual
            logger.exception("outbox: writing committed events at once failed; they go out with the next write")

    def drop(self, held: _Held, why: str) -> None:
        self.dropped += len(held.emissions)
        log = logger.warning if held.written else logger.debug
        log(
            "outbox: %d event(s) not published: %s (%s)",
            len(held.emissions),
            why,
            ", ".join(sorted({e.event_id for e in held.emissions})),
        )

    def check(self, app: Litestar) -> None:
        """At start-up: the config is in the app and the table exists, else an error naming the fix."""
        alchemy = self.outbox.alchemy
        configs = [c for plugin in app.plugins.init for c in _configs_of(plugin)]
        if not any(c is alchemy for c in configs):
            raise OutboxConfigError(
                "SQLAlchemyOutbox(config): that advanced-alchemy config is not in this app; pass the same object "
                "to the app's plugins: Litestar(plugins=[SQLAlchemyPlugin(config), CeleryEventsPlugin(...)])"
            )
        self.check_table()

    async def start(self, app: Litestar) -> None:
        """Start-up (after advanced-alchemy's lifespan, so ``create_all`` ran): check, start the relay."""
        await anyio.to_thread.run_sync(self.check, app)
        self.relay.ensure_started(relay=self.relays_orphans)

    def check_table(self) -> None:
        url = redact_url(self.outbox.database_url().render_as_string(hide_password=True))
        if url.startswith("sqlite") and (":memory:" in url or url.rstrip("/").endswith("sqlite:")):
            raise OutboxConfigError(
                f"SQLAlchemyOutbox: {url} is an in-memory SQLite database, which only this process sees; "
                "use a database file or a server so relays in other processes can read the outbox"
            )
        try:
            self._check_or_create_table()
        except OutboxTableMissingError:
            raise OutboxConfigError(
                f"the outbox table {self.table.name!r} does not exist in {url}: add it to your migrations (it is on "
                "advanced-alchemy's metadata, so `alembic revision --autogenerate` picks it up) or set "
                "create_all=True on the SQLAlchemy config"
            ) from None
        except DATABASE_ERRORS as exc:
            logger.warning("outbox: cannot check table %r in %s now (%s)", self.table.name, url, type(exc).__name__)

    def _check_or_create_table(self) -> None:
        """With ``create_all=True`` the app creates its tables at start-up, as advanced-alchemy would: a
        worker or beat started before any web process does not fail on a table not created yet."""
        store = self.relay.store
        try:
            store.check()
        except OutboxTableMissingError:
            if not getattr(self.outbox.alchemy, "create_all", False):
                raise
            self.table.metadata.create_all(store.engine, checkfirst=True)
            store.check()

    def stop(self) -> None:
        self.relay.stop()


def remember_request_scope(app: ASGIApp) -> ASGIApp:
    """ASGI middleware: the request's scope (where advanced-alchemy keeps its session) for ``hold``."""

    async def remember_scope(scope: Scope, receive: Receive, send: Send) -> None:
        token = _request_scope.set(scope)
        try:
            await app(scope, receive, send)
        finally:
            _request_scope.reset(token)

    return remember_scope


async def start_outbox(app: Litestar) -> None:
    """``on_startup``: check the outbox's config and table, start its relay thread."""
    outbox = getattr(app.event_emitter, "outbox", None)
    if outbox is not None:
        await outbox.start(app)


async def stop_outbox(app: Litestar) -> None:
    """``on_shutdown`` (after the emitter flushed): delete the rows of what went out, stop the thread."""
    outbox = getattr(app.event_emitter, "outbox", None)
    if outbox is not None:
        await anyio.to_thread.run_sync(outbox.stop)


def _configs_of(plugin: Any) -> list[Any]:
    config = getattr(plugin, "config", None)
    if config is None or isinstance(config, (str, bytes)):
        return []
    return list(config) if isinstance(config, (list, tuple)) else [config]


_listening = False


def _listen_to_sessions() -> None:
    """Once per process: the commit hooks on every SQLAlchemy session (a no-op for sessions holding nothing)."""
    global _listening
    if not _listening:
        event.listen(Session, "before_commit", _before_commit)
        event.listen(Session, "after_commit", _after_commit)
        event.listen(Session, "after_transaction_end", _after_transaction_end)
        _listening = True


def _before_commit(session: Session) -> None:
    held: _Held | None = session.info.get(HELD_KEY)
    if held is not None and held.emissions and not held.written:
        held.outbox.write(session, held)


def _after_commit(session: Session) -> None:
    held: _Held | None = session.info.pop(HELD_KEY, None)
    if held is not None and held.emissions:
        held.outbox.committed(held.emissions)


def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is not None:  # a savepoint or subtransaction: the outer transaction decides
        return
    held: _Held | None = session.info.get(HELD_KEY)
    if held is None or not held.emissions:
        return
    session.info.pop(HELD_KEY, None)
    held.outbox.drop(held, "the commit failed" if held.written else "the transaction rolled back")
