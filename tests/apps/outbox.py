"""The docs' handler on advanced-alchemy with autocommit, and a listener that looks for the user's row.

Env: ``OUTBOX_DB_URL`` (an async SQLAlchemy URL), ``OUTBOX`` (``1`` with the outbox, ``0`` plain emit),
``OUTBOX_RELAY_AFTER_S``, ``RECORD_FILE``, ``TEST_QUEUE``, ``CELERY_BROKER_URL``;
``KILL_AFTER_COMMIT=1`` SIGKILLs the web process right after a commit, before anything is published;
``OUTBOX_POOL_SIZE`` (default 5, SQLAlchemy's); ``COMMIT_LOG`` (a file) gets one JSON line per committed
user: its email and the commit's time (the bench).
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Annotated, Any

from advanced_alchemy.base import BigIntBase
from advanced_alchemy.extensions.litestar import EngineConfig, SQLAlchemyAsyncConfig, SQLAlchemyPlugin
from advanced_alchemy.repository import SQLAlchemyAsyncRepository
from litestar import Litestar, Request, post
from litestar.di import NamedDependency
from litestar.enums import RequestEncodingType
from litestar.events import listener
from litestar.exceptions import HTTPException
from litestar.params import Body
from sqlalchemy import ForeignKey, String, create_engine, event, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, Session, mapped_column
from sqlalchemy.pool import NullPool

from litestar_celery_events import CeleryEventsConfig, CeleryEventsPlugin, SQLAlchemyOutbox
from litestar_celery_events.outbox.transactions import HELD_KEY
from litestar_celery_events.stores.outbox import sync_url


class OutboxUser(BigIntBase):
    __tablename__ = "outbox_test_user"
    email: Mapped[str] = mapped_column(String(200), unique=True)


class OutboxProfile(BigIntBase):
    """Its foreign key is checked at COMMIT: a profile of a missing user makes the commit itself fail."""

    __tablename__ = "outbox_test_profile"
    user_id: Mapped[int] = mapped_column(
        ForeignKey("outbox_test_user.id", deferrable=True, initially="DEFERRED"), nullable=False
    )


class UserRepository(SQLAlchemyAsyncRepository[OutboxUser]):
    model_type = OutboxUser


def _record(**fields: Any) -> None:
    with open(os.environ["RECORD_FILE"], "a", encoding="utf-8") as out:
        out.write(json.dumps({"at": time.time(), "pid": os.getpid(), **fields}) + "\n")


_worker_engine: Any = None


def _find_user(email: str) -> bool:
    global _worker_engine
    if _worker_engine is None or _worker_engine.pid != os.getpid():  # one engine per worker process
        _worker_engine = create_engine(sync_url(os.environ["OUTBOX_DB_URL"]), pool_size=2)
        _worker_engine.pid = os.getpid()
    with _worker_engine.connect() as conn:
        return conn.execute(select(OutboxUser.id).where(OutboxUser.email == email)).first() is not None


@listener("user_created")
def send_welcome_email_handler(email: str) -> None:
    started = time.time()
    _record(listener="send_welcome_email_handler", email=email, found=_find_user(email), started=started)


@post("/users", status_code=201)
async def create_user_handler(
    data: Annotated[dict[str, str], Body(media_type=RequestEncodingType.JSON)],
    request: Request[Any, Any, Any],
    db_session: NamedDependency[AsyncSession],
) -> None:
    """The docs' handler: insert, then emit. ``mode`` makes it fail as a real app's transaction can."""
    repository = UserRepository(session=db_session)
    user = await repository.add(OutboxUser(email=data["email"]))
    db_session.info["email"] = data["email"]
    request.app.emit("user_created", email=data["email"])
    mode = data.get("mode", "ok")
    if mode == "raise":
        raise HTTPException(status_code=500, detail="failed after emit")
    if mode == "bad_fk":
        db_session.add(OutboxProfile(user_id=user.id + 10_000_000))  # checked at COMMIT only
        await db_session.flush()


def _sqlite_foreign_keys(dbapi_connection: Any, _: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _kill_right_after_commit(session: Session) -> None:
    if session.info.get(HELD_KEY):  # a commit that wrote outbox rows, before they are handed over
        os.kill(os.getpid(), signal.SIGKILL)


def _log_commit(session: Session) -> None:
    email = session.info.pop("email", None)
    if email is not None:
        with open(os.environ["COMMIT_LOG"], "a", encoding="utf-8") as out:
            out.write(json.dumps({"email": email, "at": time.time()}) + "\n")


def create_app() -> Litestar:
    url = os.environ["OUTBOX_DB_URL"]
    # SQLite keeps a transaction open after a COMMIT its deferred foreign key failed: no pooled connections.
    if url.startswith("sqlite"):
        engine_config = EngineConfig(poolclass=NullPool)
    else:
        engine_config = EngineConfig(pool_size=int(os.environ.get("OUTBOX_POOL_SIZE", "5")))
    alchemy = SQLAlchemyAsyncConfig(
        connection_string=url, before_send_handler="autocommit", engine_config=engine_config
    )
    if url.startswith("sqlite"):
        event.listen(alchemy.get_engine().sync_engine, "connect", _sqlite_foreign_keys)
    if os.environ.get("KILL_AFTER_COMMIT") == "1":
        event.listen(Session, "after_commit", _kill_right_after_commit, insert=True)  # before the outbox's
    if os.environ.get("COMMIT_LOG"):
        event.listen(Session, "after_commit", _log_commit, insert=True)  # before the outbox hands events over
    use_outbox = os.environ.get("OUTBOX", "1") == "1"
    config = CeleryEventsConfig(
        default_queue=os.environ.get("TEST_QUEUE"),
        outbox=SQLAlchemyOutbox(alchemy) if use_outbox else None,
        outbox_relay_after_s=float(os.environ.get("OUTBOX_RELAY_AFTER_S", "30")),
        listener_ledger=None if os.environ.get("LEDGER", "") == "" else os.environ["LEDGER"] == "1",
    )
    return Litestar(
        route_handlers=[create_user_handler],
        listeners=[send_welcome_email_handler],
        plugins=[SQLAlchemyPlugin(alchemy), CeleryEventsPlugin(config)],
    )
