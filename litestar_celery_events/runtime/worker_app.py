"""Builds the worker's Celery app from a Litestar app: same config, one task per event."""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING

from celery import signals
from litestar import Litestar

from litestar_celery_events.emitter import CeleryEventEmitter
from litestar_celery_events.failed_store import failed_store_for
from litestar_celery_events.runtime.failures import record_failures_in
from litestar_celery_events.runtime.hostile import record_refused_messages
from litestar_celery_events.runtime.scheduler import install_scheduling
from litestar_celery_events.runtime.tasks import register_event_tasks
from litestar_celery_events.tracing import install_worker_observability

if TYPE_CHECKING:
    from celery import Celery

__all__ = ("DEFAULT_LITESTAR_APP", "LITESTAR_APP_ENV", "create_worker_app", "load_litestar_app")

LITESTAR_APP_ENV = "LITESTAR_APP"
DEFAULT_LITESTAR_APP = "demo.app:app"


def load_litestar_app(path: str | None = None) -> Litestar:
    """Import ``module:attribute`` (Litestar CLI's convention); default env ``LITESTAR_APP``, then the demo."""
    path = path or os.environ.get(LITESTAR_APP_ENV) or DEFAULT_LITESTAR_APP
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"{LITESTAR_APP_ENV} must look like 'module:attribute', got {path!r}")
    target = getattr(importlib.import_module(module_name), attribute)
    app = target() if callable(target) and not isinstance(target, Litestar) else target
    if not isinstance(app, Litestar):
        raise TypeError(f"{path} is {type(app).__name__}, not a Litestar app")
    return app


def create_worker_app(litestar_app: Litestar | str | None = None) -> Celery:
    """The Celery app that ``celery -A worker worker|beat|flower`` runs for ``litestar_app``."""
    app = litestar_app if isinstance(litestar_app, Litestar) else load_litestar_app(litestar_app)
    emitter = app.event_emitter
    if not isinstance(emitter, CeleryEventEmitter):
        raise TypeError("the Litestar app has no CeleryEventsPlugin: add plugins=[CeleryEventsPlugin(config)]")
    celery_app = emitter.celery_app
    register_event_tasks(celery_app, emitter.registry, emitter.config)
    install_worker_observability(celery_app, emitter.config)
    install_scheduling(celery_app, emitter)
    record_failures_in(failed_store_for(emitter.config, str(celery_app.conf.broker_url)))
    record_refused_messages(celery_app, emitter.config)
    _start_emitter_in_workers(emitter)
    celery_app.litestar_app = app
    return celery_app


def _start_emitter_in_workers(emitter: CeleryEventEmitter) -> None:
    """Listeners may emit too: run the emitter's publisher in each process that runs tasks."""

    def start(**_: object) -> None:
        emitter.start()  # idempotent; in a forked child it starts afresh

    def stop(**_: object) -> None:
        if emitter.running:
            emitter.stop()

    signals.worker_process_init.connect(start, weak=False)
    signals.worker_ready.connect(start, weak=False)
    signals.worker_process_shutdown.connect(stop, weak=False)
    signals.worker_shutdown.connect(stop, weak=False)
