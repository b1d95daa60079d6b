"""The Litestar app the integration tests run on real workers.

Listeners append one JSON line per run to the file named by env RECORD_FILE, so a test can
see which listener ran, in which process, with which arguments, and how many times.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated, Any

from litestar import Litestar, Request, delete, post
from litestar.enums import RequestEncodingType
from litestar.events import listener as litestar_listener
from litestar.params import Body

from litestar_celery_events import CeleryEventsConfig, CeleryEventsPlugin, PeriodicEvent, RetryPolicy, listener

ROUTED_QUEUE = os.environ.get("ROUTED_QUEUE", "mail")


def record_file() -> Path:
    return Path(os.environ.get("RECORD_FILE", "/tmp/litestar-celery-events-records.jsonl"))


def record(name: str, *args: Any, **kwargs: Any) -> None:
    with open(record_file(), "a", encoding="utf-8") as out:
        out.write(json.dumps({"listener": name, "pid": os.getpid(), "args": args, "kwargs": kwargs}) + "\n")


def attempts_of(name: str) -> int:
    path = record_file()
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if json.loads(line)["listener"] == name)


@litestar_listener("user_created")
async def send_welcome_email_handler(email: str) -> None:
    record("send_welcome_email_handler", email=email)


@litestar_listener("user_created", "password_changed")
def send_email_handler(email: str, message: str = "welcome") -> None:
    record("send_email_handler", email=email, message=message)


@listener("user_deleted", max_retries=5, retry_backoff=True)
async def send_farewell_email_handler(email: str, **kwargs: Any) -> None:
    record("send_farewell_email_handler", email=email, **kwargs)


@listener("user_deleted")
def notify_customer_support(reason: str, **kwargs: Any) -> None:
    record("notify_customer_support", reason=reason, **kwargs)


@listener("order_placed", max_retries=4, retry_backoff=False, default_retry_delay=0.2)
async def flaky_listener(order_id: int) -> None:
    record("flaky_listener:attempt", order_id=order_id)
    if attempts_of("flaky_listener:attempt") < 3:
        raise ConnectionError("payment service unavailable")
    record("flaky_listener", order_id=order_id)


@listener("order_placed")
async def steady_listener(order_id: int) -> None:
    record("steady_listener", order_id=order_id)


@listener("order_placed", queue=ROUTED_QUEUE)
def routed_listener(order_id: int) -> None:
    record("routed_listener", order_id=order_id)


@listener("always_fails", max_retries=1, default_retry_delay=0.1, retry_backoff=False)
def always_fails(n: int) -> None:
    record("always_fails:attempt", n=n)
    raise RuntimeError(f"boom {n}")


@listener("reminder_due")
def reminder_listener(note: str) -> None:
    record("reminder_listener", note=note, at=time.time())


@listener("heartbeat")
def heartbeat_listener(**kwargs: Any) -> None:
    record("heartbeat_listener", at=time.time(), **kwargs)


def _scheduling_settings() -> dict[str, Any]:
    """Env knobs of the scheduling tests: a periodic event, a lowered visibility timeout."""
    settings: dict[str, Any] = {}
    if os.environ.get("HEARTBEAT_EVERY_S"):
        settings["periodic"] = [PeriodicEvent("heartbeat", float(os.environ["HEARTBEAT_EVERY_S"]))]
    if os.environ.get("VISIBILITY_TIMEOUT_S"):
        timeout = float(os.environ["VISIBILITY_TIMEOUT_S"])
        settings["celery_config"] = {"broker_transport_options": {"visibility_timeout": timeout}}
    return settings


@post("/users")
async def create_user(
    data: Annotated[dict[str, str], Body(media_type=RequestEncodingType.JSON)], request: Request[Any, Any, Any]
) -> None:
    request.app.emit("user_created", email=data["email"])


@delete("/users/{email:str}", status_code=204)
async def delete_user(email: str, request: Request[Any, Any, Any]) -> None:
    request.app.emit("user_deleted", email=email, reason="deleted")


def create_app() -> Litestar:
    """Built per call: broker (env CELERY_BROKER_URL) and queue (env TEST_QUEUE) are read now."""
    return Litestar(
        route_handlers=[create_user, delete_user],
        listeners=[
            send_welcome_email_handler,
            send_email_handler,
            send_farewell_email_handler,
            notify_customer_support,
            flaky_listener,
            steady_listener,
            routed_listener,
            always_fails,
            reminder_listener,
            heartbeat_listener,
        ],
        plugins=[
            CeleryEventsPlugin(
                CeleryEventsConfig(
                    default_queue=os.environ.get("TEST_QUEUE"),
                    default_retry=RetryPolicy(max_retries=2, default_retry_delay=0.1, retry_backoff=False),
                    flush_timeout_s=10,
                    **_scheduling_settings(),
                )
            )
        ],
    )
