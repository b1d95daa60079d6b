"""Listeners with typed payloads (dataclass, msgspec Struct, pydantic model), and a web-only app.

Each listener records the type it received and its fields, so a test can see that the worker
rebuilt the annotated type from JSON. ``create_web_app`` registers no listener at all: it only
declares the events it emits, as a web process that does not import the listener code would.
"""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pydantic
from litestar import Litestar

from litestar_celery_events import CeleryEventsConfig, CeleryEventsPlugin, RetryPolicy, declare_event, listener


@dataclass
class User:
    email: str
    signed_up_at: datetime.datetime


class Order(msgspec.Struct):
    order_id: int
    items: list[str]


class Invoice(pydantic.BaseModel):
    number: str
    total_cents: pydantic.PositiveInt


def _record(name: str, value: Any, **extra: Any) -> None:
    fields = msgspec.to_builtins(value) if not isinstance(value, pydantic.BaseModel) else value.model_dump(mode="json")
    line = {"listener": name, "pid": os.getpid(), "type": type(value).__name__, "fields": fields, **extra}
    with open(Path(os.environ["RECORD_FILE"]), "a", encoding="utf-8") as out:
        out.write(json.dumps(line) + "\n")


@listener("user_signed_up")
async def welcome(user: User, source: str = "web") -> None:
    _record("welcome", user, source=source, aware=user.signed_up_at.tzinfo is not None)


@listener("order_placed")
def ship(order: Order, **kwargs: Any) -> None:
    _record("ship", order)


@listener("order_placed")
def count_items(order_id: int, items: list[str], **kwargs: Any) -> None:
    """A listener of the same event without annotations gets the plain JSON values."""
    _record("count_items", {"order_id": order_id, "items": items})


@listener("invoice_sent")
def archive(invoice: Invoice) -> None:
    _record("archive", invoice)


@declare_event("user_signed_up")
def user_signed_up(user: User, source: str = "web") -> None:
    """The contract of user_signed_up, shared by the web app and the workers."""


@declare_event("invoice_sent")
def invoice_sent(invoice: Invoice) -> None:
    """The contract of invoice_sent."""


def _config() -> CeleryEventsConfig:
    return CeleryEventsConfig(
        default_queue=os.environ.get("TEST_QUEUE"),
        default_retry=RetryPolicy(max_retries=1, default_retry_delay=0.1, retry_backoff=False),
        declared_events=[user_signed_up, invoice_sent],
    )


def create_app() -> Litestar:
    """What the worker loads: the listeners."""
    return Litestar(listeners=[welcome, ship, count_items, archive], plugins=[CeleryEventsPlugin(_config())])


def create_web_app() -> Litestar:
    """A web process that imports no listener: declared events only."""
    return Litestar(plugins=[CeleryEventsPlugin(_config())])
