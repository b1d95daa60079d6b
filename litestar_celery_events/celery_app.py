"""Builds the Celery app both sides use: same broker, same JSON-only settings."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from celery import Celery

if TYPE_CHECKING:
    from litestar_celery_events.config import CeleryEventsConfig

__all__ = ("build_celery_app", "secure_defaults")


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
    if config.resolved_broker_url.startswith("filesystem://"):
        settings["broker_transport_options"] = _embedded_transport_options(config)
        # The filesystem transport has no fanout exchange: no remote control, no broadcast.
        settings["worker_enable_remote_control"] = False
    if config.default_queue:
        settings["task_default_queue"] = config.default_queue
    settings.update(config.celery_config)
    app.conf.update(settings)
    return app
