"""A listener that emits another event from inside the worker (module-level app, as most users write)."""

from __future__ import annotations

import os
from typing import Any

from litestar import Litestar

from litestar_celery_events import CeleryEventsConfig, CeleryEventsPlugin, listener
from tests.apps.recording import record


@listener("order_paid")
def relay_to_shipping(order_id: int) -> None:
    record("relay_to_shipping", order_id=order_id)
    app.emit("order_ready_to_ship", order_id=order_id, relayed_by=os.getpid())


@listener("order_ready_to_ship")
async def ship(order_id: int, **kwargs: Any) -> None:
    record("ship", order_id=order_id, **kwargs)


app = Litestar(
    listeners=[relay_to_shipping, ship],
    plugins=[CeleryEventsPlugin(CeleryEventsConfig(default_queue=os.environ.get("TEST_QUEUE")))],
)
