"""Litestar's event docs examples, unchanged but for the plugin line, on a small database.

Each listener appends what it received, and in which process, to ``<data dir>/demo-runs.jsonl``
so ``python -m demo`` can show that the worker, not the web process, ran it. Users live in SQLite
(advanced-alchemy, env ``DEMO_DATABASE_URL`` to change it); with the outbox, ``user_created``
follows the request's transaction: published after the commit, never for a rolled-back one.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

from advanced_alchemy.base import BigIntBase
from advanced_alchemy.extensions.litestar import SQLAlchemyAsyncConfig, SQLAlchemyPlugin
from litestar import Litestar, Request, post
from litestar.di import NamedDependency
from litestar.enums import RequestEncodingType
from litestar.events import listener as litestar_listener
from litestar.exceptions import ClientException
from litestar.params import Body
from sqlalchemy import String, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from litestar_celery_events import (
    CeleryEventsConfig,
    CeleryEventsPlugin,
    PeriodicEvent,
    SQLAlchemyOutbox,
    cancel_scheduled,
    emit_later,
    listener,
)

DATA_DIR = CeleryEventsConfig().resolved_data_dir  # env CELERY_EVENTS_DATA_DIR, else ./.celery-events
RUNS_FILE = DATA_DIR / "demo-runs.jsonl"


class User(BigIntBase):
    __tablename__ = "demo_user"
    email: Mapped[str] = mapped_column(String(200), unique=True)


DATA_DIR.mkdir(parents=True, exist_ok=True)
alchemy = SQLAlchemyAsyncConfig(
    connection_string=os.environ.get("DEMO_DATABASE_URL") or f"sqlite+aiosqlite:///{DATA_DIR / 'demo.sqlite3'}",
    before_send_handler="autocommit",  # commit after a 2xx response, roll back otherwise
    create_all=True,  # the users table and the outbox table
)
# Broker: env CELERY_BROKER_URL, else the embedded filesystem broker. `celery -A worker beat`
# emits "stats_report" every 2 seconds (a celery crontab works too: crontab(hour=7, minute=0)).
config = CeleryEventsConfig(
    periodic=[PeriodicEvent("stats_report", timedelta(seconds=2), kwargs={"period": "2s"})],
    outbox=SQLAlchemyOutbox(alchemy),  # emit inside a request's transaction follows its commit
)


def record(listener_name: str, *args: Any, **kwargs: Any) -> None:
    line = json.dumps({"listener": listener_name, "pid": os.getpid(), "args": args, "kwargs": kwargs})
    Path(RUNS_FILE).parent.mkdir(parents=True, exist_ok=True)
    with open(RUNS_FILE, "a", encoding="utf-8") as runs:
        runs.write(line + "\n")


@litestar_listener("user_created")  # Litestar's own decorator: runs unchanged on the worker
async def send_welcome_email_handler(email: str) -> None:
    record("send_welcome_email_handler", email=email)


@listener("user_created")  # in the worker, with the app's own database session (injected)
async def check_user_row(email: str, db_session: AsyncSession) -> None:
    found = await db_session.scalar(select(User.id).where(User.email == email))
    record("check_user_row", email=email, user_row_found=found is not None)


@listener("user_created", "password_changed")  # one listener, two events
async def send_email_handler(email: str, message: str = "Welcome aboard!") -> None:
    record("send_email_handler", email=email, message=message)


@listener("user_deleted", max_retries=5, retry_backoff=True)  # Celery retry options
async def send_farewell_email_handler(email: str, **kwargs: Any) -> None:
    record("send_farewell_email_handler", email=email, **kwargs)


@listener("user_deleted")  # a second listener on the same event; sync listeners work too
def notify_customer_support(reason: str, **kwargs: Any) -> None:
    record("notify_customer_support", reason=reason, **kwargs)


@listener("trial_ending")  # emitted later with emit_later; a cancelled one never runs
def send_trial_reminder(email: str, **kwargs: Any) -> None:
    record("send_trial_reminder", email=email, ran_at=round(time.time(), 2))


@listener("stats_report")  # emitted by beat on a schedule
def report_stats(period: str) -> None:
    record("report_stats", period=period, ran_at=round(time.time(), 2))


@dataclass
class CreateUserDTO:
    email: str


@dataclass
class DeleteUserDTO:
    email: str
    reason: str


@post("/users")
async def create_user_handler(
    data: Annotated[CreateUserDTO, Body(media_type=RequestEncodingType.JSON)],
    request: Request[Any, Any, Any],
    db_session: NamedDependency[AsyncSession],
) -> dict[str, str]:
    db_session.add(User(email=data.email))  # the docs' `await user_repository.insert(data)`
    request.app.emit("user_created", email=data.email)  # held until the transaction commits
    return {"created": data.email}


@post("/users/invite")
async def invite_user_handler(
    data: Annotated[CreateUserDTO, Body(media_type=RequestEncodingType.JSON)],
    request: Request[Any, Any, Any],
    db_session: NamedDependency[AsyncSession],
) -> dict[str, str]:
    db_session.add(User(email=data.email))
    request.app.emit("user_created", email=data.email)
    # Fails after emit: the 4xx rolls the transaction back, and the held event is dropped with it.
    raise ClientException(f"invitations are closed; {data.email} was not created")


@post("/users/password")
async def change_password_handler(
    data: Annotated[CreateUserDTO, Body(media_type=RequestEncodingType.JSON)], request: Request[Any, Any, Any]
) -> dict[str, str]:
    request.app.emit("password_changed", email=data.email, message="Your password was changed.")
    return {"changed": data.email}


@post("/users/delete", status_code=200)
async def delete_user_handler(
    data: Annotated[DeleteUserDTO, Body(media_type=RequestEncodingType.JSON)], request: Request[Any, Any, Any]
) -> dict[str, str]:
    request.app.emit("user_deleted", email=data.email, reason=data.reason)
    return {"deleted": data.email}


@dataclass
class ReminderDTO:
    email: str
    delay_s: float


@post("/reminders")
async def schedule_reminder_handler(
    data: Annotated[ReminderDTO, Body(media_type=RequestEncodingType.JSON)], request: Request[Any, Any, Any]
) -> dict[str, Any]:
    due_at = time.time() + data.delay_s
    emission_id = emit_later(request.app, "trial_ending", email=data.email, delay=data.delay_s)
    return {"emission_id": emission_id, "due_at": due_at}


@dataclass
class CancelDTO:
    emission_id: str


@post("/reminders/cancel", status_code=200, sync_to_thread=True)
def cancel_reminder_handler(
    data: Annotated[CancelDTO, Body(media_type=RequestEncodingType.JSON)], request: Request[Any, Any, Any]
) -> dict[str, bool]:
    # A sync handler run in a thread: cancel_scheduled makes one round trip to the store.
    return {"cancelled": cancel_scheduled(request.app, data.emission_id)}


app = Litestar(
    route_handlers=[
        create_user_handler,
        invite_user_handler,
        change_password_handler,
        delete_user_handler,
        schedule_reminder_handler,
        cancel_reminder_handler,
    ],
    listeners=[
        send_welcome_email_handler,
        check_user_row,
        send_email_handler,
        send_farewell_email_handler,
        notify_customer_support,
        send_trial_reminder,
        report_stats,
    ],
    plugins=[SQLAlchemyPlugin(alchemy), CeleryEventsPlugin(config)],
)
