"""The app of the broker-connection tests: its Celery settings come from env, as a deployment's would.

``CONNECTION_CELERY_CONFIG`` holds the Celery settings as JSON (``broker_use_ssl``,
``broker_transport_options`` ...); with ``BRING_CELERY_APP=1`` they go to a Celery app the app
brings (``CeleryEventsConfig(celery_app=...)``), else through ``celery_config``. The web process
and its worker load this same module, so both connect with the same settings.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from celery import Celery
from litestar import Litestar

from litestar_celery_events import CeleryEventsConfig, CeleryEventsPlugin, listener
from tests.apps.recording import record

SETTINGS_ENV = "CONNECTION_CELERY_CONFIG"
BRING_APP_ENV = "BRING_CELERY_APP"


@listener("conn_ping")
def conn_ping(n: int) -> None:
    record("conn_ping", n=n, at=time.time())


@listener("conn_fails", max_retries=0)
def conn_fails(n: int) -> None:
    raise RuntimeError(f"conn_fails {n} fails on purpose")


def celery_settings() -> dict[str, Any]:
    return dict(json.loads(os.environ.get(SETTINGS_ENV) or "{}"))


def stock_celery_app() -> Celery:
    """A plain Celery app with the same broker and settings: what ``send_task`` users have."""
    app = Celery("stock", broker=os.environ["CELERY_BROKER_URL"], set_as_current=False)
    app.conf.update(celery_settings())
    return app


def create_app() -> Litestar:
    queue = os.environ["TEST_QUEUE"]
    if os.environ.get(BRING_APP_ENV):
        config = CeleryEventsConfig(celery_app=stock_celery_app(), default_queue=queue, flush_timeout_s=10)
    else:
        config = CeleryEventsConfig(
            broker_url=os.environ["CELERY_BROKER_URL"],
            celery_config=celery_settings(),
            default_queue=queue,
            flush_timeout_s=10,
        )
    return Litestar(listeners=[conn_ping, conn_fails], plugins=[CeleryEventsPlugin(config)])
