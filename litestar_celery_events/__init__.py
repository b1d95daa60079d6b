"""Run Litestar event listeners on Celery workers: retries, persistence, Flower.

``create_worker_app`` and ``load_litestar_app`` load lazily: importing this package (the web
process) never loads the worker runtime.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from litestar_celery_events.config import CeleryEventsConfig, RetryPolicy
from litestar_celery_events.contract.payloads import EventDeclaration, PayloadValidationError, declare_event
from litestar_celery_events.contract.periodic import PeriodicEvent
from litestar_celery_events.emitter import CeleryEventEmitter
from litestar_celery_events.errors import (
    EmitterNotRunningError,
    EventBufferFullError,
    EventPayloadError,
    ListenerSignatureError,
    OutboxConfigError,
    PayloadTooLargeError,
    PluginNotInstalledError,
)
from litestar_celery_events.listeners import CeleryEventListener, listener
from litestar_celery_events.plugin import CeleryEventsPlugin
from litestar_celery_events.scheduling import ScheduleError, cancel_scheduled, emit_later

if TYPE_CHECKING:
    from litestar_celery_events.outbox import SQLAlchemyOutbox
    from litestar_celery_events.runtime.app import create_worker_app, load_litestar_app

__all__ = (
    "CeleryEventEmitter",
    "CeleryEventListener",
    "CeleryEventsConfig",
    "CeleryEventsPlugin",
    "EmitterNotRunningError",
    "EventBufferFullError",
    "EventDeclaration",
    "EventPayloadError",
    "ListenerSignatureError",
    "OutboxConfigError",
    "PayloadTooLargeError",
    "PayloadValidationError",
    "PeriodicEvent",
    "PluginNotInstalledError",
    "RetryPolicy",
    "SQLAlchemyOutbox",
    "ScheduleError",
    "cancel_scheduled",
    "create_worker_app",
    "declare_event",
    "emit_later",
    "listener",
    "load_litestar_app",
)

_WORKER_SIDE = frozenset({"create_worker_app", "load_litestar_app"})


def __getattr__(name: str) -> Any:
    if name in _WORKER_SIDE:
        from litestar_celery_events.runtime import app  # the worker runtime, loaded on first use only

        return getattr(app, name)
    if name == "SQLAlchemyOutbox":  # needs the optional SQLAlchemy extra: imported when asked for
        from litestar_celery_events.outbox import SQLAlchemyOutbox

        return SQLAlchemyOutbox
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
