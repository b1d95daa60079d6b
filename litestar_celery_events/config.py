"""Configuration shared by the web process (emitter) and the Celery worker."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from litestar_celery_events.brokers import embedded_broker_url
from litestar_celery_events.contract.events import event_task_name, listener_task_name

if TYPE_CHECKING:
    from celery import Celery
    from litestar.types import LifespanHook

    from litestar_celery_events.contract.message import Emission
    from litestar_celery_events.contract.payloads import EventDeclaration
    from litestar_celery_events.contract.periodic import PeriodicEvent

__all__ = (
    "BROKER_URL_ENV",
    "LITESTAR_APP_ENV",
    "LOG_FORMAT_ENV",
    "DEFAULT_FLUSH_TIMEOUT_S",
    "CeleryEventsConfig",
    "RetryPolicy",
)

BROKER_URL_ENV = "CELERY_BROKER_URL"
LITESTAR_APP_ENV = "LITESTAR_APP"
"""``module:attribute`` of the Litestar app a worker loads (Litestar CLI's convention)."""
LOG_FORMAT_ENV = "CELERY_EVENTS_LOG_FORMAT"
"""``json``: the worker writes each log record as one JSON object per line."""
DATA_DIR_ENV = "CELERY_EVENTS_DATA_DIR"
STATE_URL_ENV = "CELERY_EVENTS_STATE_URL"
DEFAULT_DATA_DIR = ".celery-events"
DEFAULT_FLUSH_TIMEOUT_S = 5.0
DEFAULT_MAX_BUFFERED_EVENTS = 100_000
DEFAULT_MAX_PAYLOAD_BYTES = 1_000_000
DEFAULT_MAX_SPOOLED_EVENTS = 1_000_000
DEFAULT_PUBLISH_BATCH_BYTES = 4_000_000
DEFAULT_WORKER_SHUTDOWN_TIMEOUT_S = 10.0
DEFAULT_OUTBOX_RELAY_AFTER_S = 30.0
DEFAULT_LEDGER_RETENTION_S = 7 * 24 * 3600.0


class Outbox(Protocol):
    """What ``CeleryEventsConfig.outbox`` takes: ``SQLAlchemyOutbox`` (``litestar_celery_events.outbox``)."""

    def attach(
        self,
        config: CeleryEventsConfig,
        submit: Callable[[Emission], None],
        open_transport: Callable[[], Any],
        on_refused: Callable[[Emission, str], None],
        write_now: Callable[[], None],
    ) -> Any:
        """The outbox of one emitter: ``submit`` hands an emission to its publisher, ``write_now`` asks it
        to write what it holds without waiting (after a commit); the relay publishes through
        ``open_transport()`` and hands a message the broker refuses to ``on_refused``."""

    def database_url(self) -> Any:
        """The outbox's database (an SQLAlchemy URL): the shared state's home when the broker is not Redis."""


def _require_positive(config: object, *names: str) -> None:
    for name in names:
        if not getattr(config, name) > 0:
            raise ValueError(f"{name} must be positive")


def _check_async_concurrency(value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError("async_concurrency must be at least 1, or None to keep Celery's pool settings")


@dataclass(frozen=True)
class RetryPolicy:
    """Celery retry options applied to listeners that set none of their own.

    The names are Celery's (``Task.max_retries``, ``Task.retry_backoff`` ...), so they mean what
    a Celery user expects: a listener runs at most ``1 + max_retries`` times.
    """

    max_retries: int = 3
    """Retries after the first attempt; ``0`` disables retrying."""
    default_retry_delay: float = 1.0
    """Seconds before a retry when ``retry_backoff`` is off."""
    retry_backoff: bool | float = True
    """Exponential backoff: ``True`` for factor 1 s, or the factor in seconds."""
    retry_backoff_max: float = 600.0
    """Upper bound of the backoff, in seconds."""
    retry_jitter: bool = True
    """Randomise the backoff (Celery's full jitter) so retries of a burst spread out."""
    autoretry_for: tuple[type[BaseException], ...] = (Exception,)
    """Exceptions that trigger a retry; others fail the listener at once."""

    def as_task_options(self) -> dict[str, Any]:
        return {
            "max_retries": self.max_retries,
            "default_retry_delay": self.default_retry_delay,
            "retry_backoff": self.retry_backoff,
            "retry_backoff_max": self.retry_backoff_max,
            "retry_jitter": self.retry_jitter,
            "autoretry_for": self.autoretry_for,
        }


@dataclass
class CeleryEventsConfig:
    """How Litestar events reach Celery: broker, task naming, retries and the publisher's buffer."""

    broker_url: str | None = None
    """Broker URL. Precedence: this argument, then env ``CELERY_BROKER_URL``, then the embedded
    filesystem broker under ``data_dir`` (no server needed; shared by an app and a worker started
    from the same directory)."""
    celery_app: Celery | None = None
    """Bring your own Celery app; its broker and settings are used as they are."""
    celery_config: Mapping[str, Any] = field(default_factory=dict)
    """Celery settings passed through unchanged, e.g. ``{"broker_transport_options": {...}}``."""
    task_name_prefix: str = "events"
    """Event tasks are named ``<prefix>.<event_id>`` so Flower lists them by event."""
    default_retry: RetryPolicy = field(default_factory=RetryPolicy)
    """Retry policy of listeners that set no Celery retry options (plain Litestar listeners)."""
    default_queue: str | None = None
    """Shorthand for Celery's ``task_default_queue`` (so ``task_routes`` still apply); ``None`` keeps
    Celery's. Setting both to different queues is an error."""
    data_dir: str | None = None
    """Folder for the embedded broker and local state; env ``CELERY_EVENTS_DATA_DIR``, else
    ``./.celery-events``."""
    max_buffered_events: int = DEFAULT_MAX_BUFFERED_EVENTS
    """Events held in memory while the publisher catches up or the broker is away."""
    buffer_full_policy: Literal["raise", "drop_oldest"] = "raise"
    """When the buffer is full: raise ``EventBufferFullError`` at ``emit`` or drop the oldest
    event with an error log. Never silent."""
    flush_timeout_s: float = DEFAULT_FLUSH_TIMEOUT_S
    """On shutdown, how long to keep publishing what is buffered before giving up (and logging)."""
    publish_on_event_loop: bool = True
    """In an async app on a plain Redis broker (no TLS, no Sentinel), publish from the app's event
    loop on a non-blocking connection while the broker answers; the publisher thread takes over
    for anything else (delays, failures, shutdown). ``False``: always the thread."""
    publish_batch_size: int = 500
    """Most messages the publisher sends in one round trip."""
    publish_batch_bytes: int = DEFAULT_PUBLISH_BATCH_BYTES
    """Most bytes of encoded arguments the publisher sends in one round trip (a batch holds at
    least one event): big events go out in small batches, each written well within its timeout."""
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    """Encoded arguments above this size raise ``PayloadTooLargeError`` at ``emit``."""
    check_signatures: bool = True
    """At ``emit``, check that every listener accepts the emitted arguments (a cheap check)."""
    declared_events: Sequence[EventDeclaration] = ()
    """Event contracts (``declare_event``): ``emit`` checks their arguments even in a process that
    registers no listener of the event (a web process that does not import the listener code)."""
    timezone: str = "UTC"
    """Timezone of periodic schedules."""
    periodic: list[PeriodicEvent] = field(default_factory=list)
    """Events ``celery -A worker beat`` emits on a schedule (``PeriodicEvent(event_id, crontab |
    timedelta | seconds, ...)``); each tick fires once, even with two beat processes running."""
    delayed_poll_interval_s: float = 0.2
    """Redis brokers: longest wait of a mover (one per worker main process and beat) between two
    looks at the delayed-event store; a due event is enqueued within about this much."""
    spool: bool = False
    """Durable local spool (SQLite under ``data_dir/spool``): while the broker is unreachable, events
    go to disk instead of memory, so a web-process crash during an outage loses none of them; the
    next process started on the same ``data_dir`` publishes what a dead one left, oldest first."""
    spool_after_events: int = 0
    """With ``spool``: events kept in memory only during an outage before the spool takes over;
    ``0`` spools every event as soon as a publish fails."""
    max_spooled_events: int = DEFAULT_MAX_SPOOLED_EVENTS
    """Most events one process keeps in its spool."""
    spool_full_policy: Literal["raise", "drop_oldest"] = "raise"
    """When the spool is full: raise ``EventBufferFullError`` at ``emit`` or drop the oldest spooled
    event with an error log. Never silent."""
    worker_lifespan: bool = True
    """Run the Litestar app's lifespan in every worker process that runs listeners, as the web
    process does: ``on_startup`` hooks, ``lifespan=[...]`` context managers and plugins' start-up
    (advanced-alchemy's engine in ``app.state``) once before the process takes its first task, on
    the event loop that runs its async listeners; ``on_shutdown`` and the context managers' exits
    when it ends. ``False`` for an app whose start-up is web-only (``worker_on_startup`` still runs)."""
    worker_on_startup: Sequence[LifespanHook] = ()
    """Hooks only worker processes run, after the app's start-up (``hook(app)`` or ``hook()``, sync or
    async, like Litestar's ``on_startup``); one that raises stops the worker."""
    worker_on_shutdown: Sequence[LifespanHook] = ()
    """Hooks only worker processes run when they end, before the app's shutdown side."""
    worker_shutdown_timeout_s: float = DEFAULT_WORKER_SHUTDOWN_TIMEOUT_S
    """Longest wait for a worker process's shutdown side (``worker_on_shutdown``, the app's
    ``on_shutdown`` and lifespan exits); past it the rest is abandoned, with an error log."""
    async_concurrency: int | None = None
    """Run up to this many listeners at once in each worker process, on one asyncio event loop
    (sync listeners on a thread pool beside it): ``celery -A worker worker`` then uses the pool
    ``litestar_celery_events.runtime.aio_pool:AsyncListenerPool`` with ``worker_concurrency`` set to
    this. ``None``: Celery's own pool settings (prefork by default). Needs the ``async`` extra."""
    state_url: str | None = None
    """The store every worker, beat and web process shares: cancels of delayed events and beat's tick
    claims (brokers other than Redis), failed events and the listener ledger. A ``redis://``/``rediss://``
    URL or an SQLAlchemy database URL (``postgresql+psycopg://...``, ``sqlite:///path``; the ``sql``
    extra). Then env ``CELERY_EVENTS_STATE_URL``. Default: the broker's Redis, else the outbox's
    database, else SQLite under ``data_dir`` (one machine: a warning at start-up when the broker is
    not the embedded one)."""
    failed_store_url: str | None = None
    """Deprecated name of ``state_url`` (a ``DeprecationWarning``); kept for one release."""
    outbox: Outbox | None = None
    """``SQLAlchemyOutbox(<advanced-alchemy config>)``: ``emit`` inside a request (or ``outbox.bind(session)``)
    whose session has a transaction open is published only if that transaction commits, and survives a
    crash between commit and publish (outbox rows written in the same transaction)."""
    outbox_relay_after_s: float = DEFAULT_OUTBOX_RELAY_AFTER_S
    """Lease of an outbox row: a row its process has not published (nor renewed) for this long is taken
    over and published by any live process of the app (web process or worker)."""
    listener_ledger: bool | None = None
    """Runs once: workers record each listener that completed for an emission and skip it if the emission
    comes again (a relay racing the publish, a redelivery). ``None``: on with an ``outbox``. Kept in the
    state store (``state_url``)."""
    listener_ledger_retention_s: float = DEFAULT_LEDGER_RETENTION_S
    """How long a completed run is remembered; a duplicate arriving later runs the listener again."""

    def __post_init__(self) -> None:
        if not self.task_name_prefix or any(c.isspace() for c in self.task_name_prefix):
            raise ValueError("task_name_prefix must be a non-empty string without whitespace")
        if self.max_buffered_events < 1:
            raise ValueError("max_buffered_events must be at least 1")
        if self.flush_timeout_s < 0:
            raise ValueError("flush_timeout_s must not be negative")
        if self.publish_batch_size < 1:
            raise ValueError("publish_batch_size must be at least 1")
        if self.publish_batch_bytes < 1:
            raise ValueError("publish_batch_bytes must be at least 1")
        configured = self.celery_config.get("task_default_queue")
        if self.default_queue and configured and configured != self.default_queue:
            raise ValueError(
                f"default_queue={self.default_queue!r} and celery_config={{'task_default_queue': {configured!r}}} "
                "disagree; set only one of them (default_queue is a shorthand for task_default_queue)"
            )
        if self.buffer_full_policy not in ("raise", "drop_oldest"):
            raise ValueError("buffer_full_policy must be 'raise' or 'drop_oldest'")
        if not self.delayed_poll_interval_s > 0:
            raise ValueError("delayed_poll_interval_s must be positive")
        names = [p.key for p in self.periodic]
        if len(names) != len(set(names)):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"periodic events need distinct names; give name= to tell apart: {twice}")
        if self.spool_full_policy not in ("raise", "drop_oldest"):
            raise ValueError("spool_full_policy must be 'raise' or 'drop_oldest'")
        if self.worker_shutdown_timeout_s < 0:
            raise ValueError("worker_shutdown_timeout_s must not be negative")
        _require_positive(self, "outbox_relay_after_s", "listener_ledger_retention_s")
        _check_failed_store_url(self.state_url, self.failed_store_url)
        _check_async_concurrency(self.async_concurrency)
        if self.spool_after_events < 0 or self.max_spooled_events < 1:
            raise ValueError("spool_after_events must be >= 0 and max_spooled_events >= 1")

    @property
    def resolved_data_dir(self) -> Path:
        return Path(self.data_dir or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR).resolve()

    @property
    def resolved_broker_url(self) -> str:
        if self.celery_app is not None:
            return str(self.celery_app.conf.broker_url or embedded_broker_url())
        return self.broker_url or os.environ.get(BROKER_URL_ENV) or embedded_broker_url()

    def event_task_name(self, event_id: str) -> str:
        return event_task_name(self.task_name_prefix, event_id)

    def listener_task_name(self, event_id: str, listener_name: str) -> str:
        return listener_task_name(self.task_name_prefix, event_id, listener_name)


def _check_failed_store_url(state_url: str | None, failed_store_url: str | None) -> None:
    if failed_store_url is None:
        return
    if state_url is not None and state_url != failed_store_url:
        raise ValueError("state_url and failed_store_url (its old name) name different stores; set only state_url")
    warnings.warn(
        "CeleryEventsConfig(failed_store_url=...) is deprecated: use state_url=..., which also holds "
        "cancels, beat's ticks and the listener ledger",
        DeprecationWarning,
        stacklevel=4,
    )
