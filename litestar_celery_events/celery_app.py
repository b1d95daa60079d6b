"""Builds the Celery app both sides use: same broker, same JSON-only settings."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from celery import Celery

from litestar_celery_events.brokers import is_embedded_url, is_redis_url

if TYPE_CHECKING:
    from litestar_celery_events.config import CeleryEventsConfig

__all__ = ("build_celery_app", "secure_defaults")


DEFAULT_CELERY_QUEUE = "celery"
"""Celery's own ``task_default_queue``."""

REDIS_TRANSPORT_DEFAULTS: dict[str, Any] = {"unacked_restore_throttle": 1}
"""Messages a dead worker left unacknowledged (kill -9, OOM) go back to their queue once their
``visibility_timeout`` has passed: kombu looks for them on every sweep (every 10 s) instead of
every 10th sweep, so they come back within about ``visibility_timeout + 10 s``, not ``+ 100 s``.
Used when neither ``celery_config`` nor a brought Celery app sets ``broker_transport_options``."""


def secure_defaults() -> dict[str, Any]:
    """JSON only, also on a bring-your-own app: a pickle message is refused unread."""
    return {
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "event_serializer": "json",
        "broker_connection_retry_on_startup": True,
    }


ASYNC_POOL = "litestar_celery_events.runtime.aio_pool:AsyncListenerPool"
ASYNC_PREFETCH_MULTIPLIER = 2
"""With the asyncio pool, messages reserved per listener slot: one running, one waiting its turn."""


def async_pool_settings(concurrency: int) -> dict[str, Any]:
    """Celery settings that make ``celery -A worker worker`` run the asyncio pool (no CLI flag needed)."""
    return {
        "worker_pool": ASYNC_POOL,
        "worker_concurrency": concurrency,
        "worker_prefetch_multiplier": ASYNC_PREFETCH_MULTIPLIER,
    }


def _embedded_transport_options(config: CeleryEventsConfig) -> dict[str, Any]:
    folder = config.resolved_data_dir / "broker"
    (folder / "processed").mkdir(parents=True, exist_ok=True)
    return {
        "data_folder_in": str(folder),
        "data_folder_out": str(folder),
        "processed_folder": str(folder / "processed"),
        "control_folder": str(folder / "control"),  # kombu's default is ./control in the cwd
        "store_processed": False,
    }


def build_celery_app(config: CeleryEventsConfig, main: str = "litestar_celery_events") -> Celery:
    """Return ``config.celery_app`` (hardened) or a new Celery app for ``config``."""
    app = config.celery_app or Celery(main, set_as_current=False)
    settings: dict[str, Any] = secure_defaults()
    if config.celery_app is None:
        settings["broker_url"] = config.resolved_broker_url
        settings["timezone"] = config.timezone
    if is_embedded_url(config.resolved_broker_url):
        settings["broker_transport_options"] = _embedded_transport_options(config)
        # The filesystem transport has no fanout exchange: no remote control, no broadcast.
        settings["worker_enable_remote_control"] = False
    if config.default_queue:
        brought = app.conf.task_default_queue if config.celery_app is not None else None
        if brought not in (None, DEFAULT_CELERY_QUEUE, config.default_queue):
            raise ValueError(
                f"default_queue={config.default_queue!r} and the Celery app's task_default_queue={brought!r} "
                "disagree; set only one of them (default_queue is a shorthand for task_default_queue)"
            )
        settings["task_default_queue"] = config.default_queue
    if config.async_concurrency is not None:
        settings.update(async_pool_settings(config.async_concurrency))
    embedded_options = settings.get("broker_transport_options", {})
    settings.update(config.celery_config)
    if embedded_options:  # the embedded broker's folders stay, whatever else celery_config sets
        settings["broker_transport_options"] = {**embedded_options, **settings["broker_transport_options"]}
    redis = is_redis_url(config.resolved_broker_url)
    if redis and "broker_transport_options" not in settings and not app.conf.broker_transport_options:
        settings["broker_transport_options"] = dict(REDIS_TRANSPORT_DEFAULTS)  # yours, if any, are kept as they are
    app.conf.update(settings)
    return app
