"""An app whose listeners use what its start-up made: the worker must run its lifespan, and inject.

One listener per thing a new user tries: ``app.state`` filled in ``on_startup``, a loop-bound pool
from a ``lifespan=[...]`` context manager, a module global set in ``on_startup``, advanced-alchemy's
engine in ``app.state`` and its ``db_session`` injected, plus app-level, listener-level and
generator dependencies. Each run appends a JSON line to env RECORD_FILE (``tests.apps.recording``).

Env: ``DB_URL`` (SQLAlchemy async URL, the ``orders`` table already created by the test),
``FAIL_STARTUP`` (an ``on_startup`` hook raises), ``WORKER_LIFESPAN=0`` (the opt-out).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from advanced_alchemy.extensions.litestar import SQLAlchemyAsyncConfig, SQLAlchemyPlugin
from litestar import Litestar
from litestar.datastructures import State
from litestar.di import Provide
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from litestar_celery_events import CeleryEventsConfig, CeleryEventsPlugin, RetryPolicy, listener
from tests.apps.recording import record


class Mailer:
    """Stands for an SDK client a start-up hook creates."""

    def send(self, to: str) -> str:
        return f"sent to {to}"


class LoopBoundPool:
    """Stands for an asyncpg/httpx pool: usable only on the loop that created it."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.slots: asyncio.Queue[int] = asyncio.Queue()
        for slot in range(2):
            self.slots.put_nowait(slot)
        self.closed = False

    async def run(self, value: int) -> int:
        if asyncio.get_running_loop() is not self.loop:
            raise RuntimeError("pool used from a loop other than the one that created it")
        slot = await self.slots.get()  # an asyncio.Queue binds to its loop: another loop fails here
        try:
            await asyncio.sleep(0.01)
            return value * 2
        finally:
            self.slots.put_nowait(slot)


mailer: Mailer | None = None
"""Set by ``on_startup``, as many apps do with their SDK clients."""


def set_up_clients(app: Litestar) -> None:
    global mailer
    if os.environ.get("FAIL_STARTUP"):
        raise RuntimeError("cannot reach the billing API at start-up")
    time.sleep(float(os.environ.get("STARTUP_DELAY_S", "0")))  # a slow start-up: connecting, warming caches
    mailer = Mailer()
    app.state.some_client = Mailer()
    record("startup", pid=os.getpid())


def on_shutdown_hook() -> None:
    record("shutdown", pid=os.getpid())


def worker_only_startup(app: Litestar) -> None:
    record("worker_startup", pid=os.getpid())


async def worker_only_shutdown() -> None:
    record("worker_shutdown", pid=os.getpid())


@asynccontextmanager
async def pool_lifespan(app: Litestar) -> AsyncIterator[None]:
    app.state.pool = pool = LoopBoundPool()
    try:
        yield
    finally:
        pool.closed = True
        record("pool_closed", pid=os.getpid())


@listener("uses_state_client")
async def uses_state_client(to: str, state: State) -> None:
    record("uses_state_client", result=state.some_client.send(to))


@listener("uses_lifespan_pool")
async def uses_lifespan_pool(value: int, state: State) -> None:
    pool: LoopBoundPool = state.pool
    record("uses_lifespan_pool", result=await pool.run(value))


@listener("uses_module_global")
def uses_module_global(to: str) -> None:
    assert mailer is not None, "on_startup did not run in this process"
    record("uses_module_global", result=mailer.send(to))


@listener("uses_engine")
async def uses_engine(value: int, state: State) -> None:
    engine: AsyncEngine = state["db_engine"]
    async with engine.connect() as connection:
        result = (await connection.execute(text("SELECT :v + 1"), {"v": value})).scalar_one()
    record("uses_engine", result=result)


def provide_tax_rate() -> float:
    return 0.2


async def provide_audit_log() -> AsyncIterator[list[str]]:
    """A generator dependency: its cleanup runs after the listener call."""
    entries: list[str] = []
    yield entries
    record("audit_cleanup", entries=entries, pid=os.getpid())


@listener(
    "order_placed",
    dependencies={"audit": Provide(provide_audit_log)},
)
async def save_order(order_id: int, amount: float, db_session: AsyncSession, tax_rate: float, audit: list[str]) -> None:
    total = round(amount * (1 + tax_rate), 2)
    await db_session.execute(
        text("INSERT INTO orders (id, total) VALUES (:id, :total)"), {"id": order_id, "total": total}
    )
    audit.append(f"order {order_id}")
    if order_id < 0:
        raise ValueError("negative order ids are refused after the insert: it must be rolled back")
    record("save_order", order_id=order_id, total=total)


@listener("order_counted")
def count_orders_sync(label: str, tax_rate: float, app: Litestar) -> None:
    record("count_orders_sync", label=label, tax_rate=tax_rate, app=type(app).__name__)


def create_app() -> Litestar:
    db_url = os.environ.get("DB_URL", "sqlite+aiosqlite:///:memory:")
    alchemy = SQLAlchemyAsyncConfig(connection_string=db_url, before_send_handler="autocommit", create_all=False)
    return Litestar(
        on_startup=[set_up_clients],
        on_shutdown=[on_shutdown_hook],
        lifespan=[pool_lifespan],
        dependencies={"tax_rate": Provide(provide_tax_rate, sync_to_thread=False)},
        listeners=[
            uses_state_client,
            uses_lifespan_pool,
            uses_module_global,
            uses_engine,
            save_order,
            count_orders_sync,
        ],
        plugins=[
            CeleryEventsPlugin(
                CeleryEventsConfig(
                    default_queue=os.environ.get("TEST_QUEUE"),
                    default_retry=RetryPolicy(max_retries=1, default_retry_delay=0.1, retry_backoff=False),
                    worker_lifespan=os.environ.get("WORKER_LIFESPAN", "1") != "0",
                    worker_on_startup=[worker_only_startup],
                    worker_on_shutdown=[worker_only_shutdown],
                    # env ASYNC_CONCURRENCY: the asyncio pool (listeners on the same process loop)
                    async_concurrency=int(os.environ["ASYNC_CONCURRENCY"])
                    if os.environ.get("ASYNC_CONCURRENCY")
                    else None,
                )
            ),
            SQLAlchemyPlugin(config=alchemy),
        ],
    )
