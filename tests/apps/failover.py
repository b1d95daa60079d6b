"""The app of the Sentinel failover test: listeners that record which emission ran, when, in which process.

Env: ``CELERY_BROKER_URL`` (``sentinel://...``), ``SENTINEL_MASTER`` (the group's name),
``TEST_QUEUE``, ``RECORD_FILE``, ``HEARTBEAT_EVERY_S`` (beat's periodic event). The web process
(the test), its worker and its beat load this same module, so all three reach Redis through the
same Sentinels.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery, current_task
from litestar import Litestar

from litestar_celery_events import CeleryEventsConfig, CeleryEventsPlugin, PeriodicEvent, listener
from tests.apps.recording import record


@listener("ha_ping")
def ha_ping(n: int, kind: str) -> None:
    record("ha_ping", n=n, kind=kind, id=current_task.request.id, at=time.time())


@listener("ha_fails", max_retries=0)
def ha_fails(n: int) -> None:
    raise RuntimeError(f"ha_fails {n} fails on purpose")


@listener("ha_tick")
def ha_tick() -> None:
    request = current_task.request
    record("ha_tick", tick=request.get("tick"), id=request.id, at=time.time())


def celery_settings() -> dict[str, Any]:
    options: dict[str, Any] = {"master_name": os.environ["SENTINEL_MASTER"]}
    if os.environ.get("VISIBILITY_TIMEOUT_S"):
        options["visibility_timeout"] = float(os.environ["VISIBILITY_TIMEOUT_S"])
    return {"broker_transport_options": options}


def stock_celery_app() -> Celery:
    """A plain Celery app with the same broker settings: what ``send_task`` users have."""
    app = Celery("stock", broker=os.environ["CELERY_BROKER_URL"], set_as_current=False)
    app.conf.update(celery_settings())
    return app


def create_app() -> Litestar:
    config = CeleryEventsConfig(
        broker_url=os.environ["CELERY_BROKER_URL"],
        celery_config=celery_settings(),
        default_queue=os.environ["TEST_QUEUE"],
        periodic=[PeriodicEvent("ha_tick", float(os.environ.get("HEARTBEAT_EVERY_S", "1")))],
        delayed_poll_interval_s=0.2,
        flush_timeout_s=30,
    )
    return Litestar(listeners=[ha_ping, ha_fails, ha_tick], plugins=[CeleryEventsPlugin(config)])
