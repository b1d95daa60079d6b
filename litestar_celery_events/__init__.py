"""Run Litestar event listeners on Celery workers: retries, persistence, Flower."""

from litestar_celery_events.config import CeleryEventsConfig, RetryPolicy
from litestar_celery_events.emitter import CeleryEventEmitter
from litestar_celery_events.errors import (
    EmitterNotRunningError,
    EventBufferFullError,
    EventPayloadError,
    ListenerSignatureError,
    PayloadTooLargeError,
)
from litestar_celery_events.listeners import CeleryEventListener, listener
from litestar_celery_events.payloads import EventDeclaration, PayloadValidationError, declare_event
from litestar_celery_events.plugin import CeleryEventsPlugin
from litestar_celery_events.runtime.worker_app import create_worker_app, load_litestar_app
from litestar_celery_events.scheduling import PeriodicEvent, ScheduleError, cancel_scheduled, emit_later

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
    "PayloadTooLargeError",
    "PayloadValidationError",
    "PeriodicEvent",
    "RetryPolicy",
    "ScheduleError",
    "cancel_scheduled",
    "create_worker_app",
    "declare_event",
    "emit_later",
    "listener",
    "load_litestar_app",
)
