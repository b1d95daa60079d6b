"""Builds the worker's Celery app from a Litestar app: same config, one task per event."""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING

from celery import signals
from litestar import Litestar
from litestar.exceptions import ImproperlyConfiguredException

from litestar_celery_events.brokers import is_amqp_url
from litestar_celery_events.config import LITESTAR_APP_ENV
from litestar_celery_events.emitter import CeleryEventEmitter, emitter_of
from litestar_celery_events.runtime.acks import BatchRedisAcks
from litestar_celery_events.runtime.beat import install_scheduling
from litestar_celery_events.runtime.brpop import EarlyRedisFetch
from litestar_celery_events.runtime.dependencies import prepare_injectors
from litestar_celery_events.runtime.failures import record_failures_in
from litestar_celery_events.runtime.hostile import record_refused_messages
from litestar_celery_events.runtime.ledger import run_once_for
from litestar_celery_events.runtime.lifespan import install_worker_lifespan
from litestar_celery_events.runtime.observability import install_worker_observability
from litestar_celery_events.runtime.redis_fetch import use_reliable_fetch
from litestar_celery_events.runtime.tasks import register_event_tasks
from litestar_celery_events.stores.state import check_state_store, failed_store_for

if TYPE_CHECKING:
    from celery import Celery

__all__ = ("create_worker_app", "load_litestar_app")


def load_litestar_app(path: str | None = None) -> Litestar:
    """Import ``module:attribute`` (Litestar CLI's convention); default: env ``LITESTAR_APP``."""
    path = path or os.environ.get(LITESTAR_APP_ENV)
    if not path:
        raise ValueError(
            f"no Litestar app to load: pass create_worker_app('myapp:app') or set {LITESTAR_APP_ENV}=myapp:app"
        )
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
    emitter = emitter_of(app)
    if emitter.outbox is not None:
        emitter.outbox.check(app)  # a missing outbox table stops the worker at start-up, not at a commit
    celery_app = emitter.celery_app
    unresolved = sorted(set(emitter.registry.unresolved.values()))
    if unresolved:
        raise ImproperlyConfiguredException("; ".join(unresolved))
    prepare_injectors(app, emitter.registry)  # a dependency a listener call cannot get fails here
    use_reliable_fetch(celery_app)
    _confirm_worker_publishes(celery_app)
    listener_scope = install_worker_observability(celery_app, emitter.config)
    run_once = run_once_for(emitter, celery_app)
    register_event_tasks(celery_app, emitter.registry, emitter.config, listener_scope, run_once)
    install_scheduling(celery_app, emitter)
    check_state_store(emitter.config, celery_app, "celery worker")  # unreachable: stop here, naming state_url
    record_failures_in(failed_store_for(emitter.config, celery_app))
    record_refused_messages(celery_app, emitter.config)
    install_worker_lifespan(celery_app, app, emitter)  # pool children, or the main process (solo, threads)
    if emitter.config.async_concurrency is not None:  # the consumer is the ceiling: fewer round trips
        celery_app.steps["consumer"].update((BatchRedisAcks, EarlyRedisFetch))
    _start_emitter_in_main_process(emitter)
    celery_app.litestar_app = app
    return celery_app


def _confirm_worker_publishes(celery_app: Celery) -> None:
    """On RabbitMQ, what a task sends (a listener's retry) is confirmed before that task is acknowledged.

    Without confirms, a retry written to a connection the broker then drops is lost, while the
    task that sent it counts as done. Per message (kombu's ``confirm_publish``): retries are few.
    """
    if is_amqp_url(celery_app.conf.broker_url):
        options = dict(celery_app.conf.broker_transport_options or {})
        options.setdefault("confirm_publish", True)
        celery_app.conf.broker_transport_options = options


def _start_emitter_in_main_process(emitter: CeleryEventEmitter) -> None:
    """The main process publishes too (the worker lifespan starts the emitter where listeners run)."""

    def start(**_: object) -> None:
        emitter.start()  # idempotent

    def start_outbox_relay(**_: object) -> None:
        if emitter.outbox is not None:  # the main process relays rows a dead web process left
            emitter.outbox.relay.ensure_started(relay=True)

    def stop(**_: object) -> None:
        if emitter.running:
            emitter.stop()
        if emitter.outbox is not None:
            emitter.outbox.stop()

    signals.worker_ready.connect(start, weak=False)
    signals.worker_ready.connect(start_outbox_relay, weak=False)
    signals.worker_shutdown.connect(stop, weak=False)
