"""Runs only inside a Celery worker: loads the Litestar app, registers one task per event."""

from litestar_celery_events.runtime.worker_app import LITESTAR_APP_ENV, create_worker_app, load_litestar_app

__all__ = ("LITESTAR_APP_ENV", "create_worker_app", "load_litestar_app")
