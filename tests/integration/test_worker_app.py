"""The worker runs the app's lifespan and injects listener dependencies, under every pool.

Real ``celery -A worker worker`` processes on a private Redis: each listener of
``tests.apps.lifespan_app`` uses something only the app's start-up makes (``app.state``, a
loop-bound pool from ``lifespan=[...]``, a module global, advanced-alchemy's engine and session)
and is emitted 4 times; every run must succeed, in a process whose start-up ran.
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from litestar_celery_events import CeleryEventEmitter
from tests.apps.lifespan_app import create_app
from tests.conftest import SESSION_TAG
from tests.helpers import CeleryProcess, celery_worker, runs_of, wait_for

pytestmark = pytest.mark.integration

POOLS = {
    "prefork": [],
    "solo": ["--pool", "solo"],
    "threads": ["--pool", "threads", "--concurrency", "4"],
}
ROWS = {
    "uses_state_client": ("to", lambda i: f"user{i}@example.com", lambda i: f"sent to user{i}@example.com"),
    "uses_lifespan_pool": ("value", lambda i: i, lambda i: i * 2),
    "uses_module_global": ("to", lambda i: f"user{i}@example.com", lambda i: f"sent to user{i}@example.com"),
    "uses_engine": ("value", lambda i: i, lambda i: i + 1),
}
TIMES = 4
POSTGRES = "postgresql://postgres@127.0.0.1:5432"
ORDERS_TABLE = "CREATE TABLE orders (id integer PRIMARY KEY, total double precision NOT NULL)"
PG_ORDERS_TABLE = (  # checked at COMMIT, not at INSERT: the case where only the commit can fail
    "CREATE TABLE orders (id integer NOT NULL, total double precision NOT NULL,"
    " CONSTRAINT one_row_per_order UNIQUE (id) DEFERRABLE INITIALLY DEFERRED)"
)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    path = tmp_path / "orders.sqlite3"
    with sqlite3.connect(path) as connection:
        connection.execute(ORDERS_TABLE)
    return f"sqlite+aiosqlite:///{path}"


def _sqlite_orders(url: str) -> list[tuple[int, float]]:
    with sqlite3.connect(url.removeprefix("sqlite+aiosqlite:///")) as connection:
        return sorted(connection.execute("SELECT id, total FROM orders").fetchall())


async def _pg(database: str, *statements: str) -> list[Any]:
    connection = await asyncpg.connect(f"{POSTGRES}/{database}")
    try:
        results = [await connection.fetch(statement) for statement in statements]
    finally:
        await connection.close()
    return results


@pytest.fixture(scope="session")
def postgres_database(postgres_server: str) -> Iterator[str]:
    """A database of this test session's own on the machine's PostgreSQL, dropped at the end."""
    name = f"lce_worker_app_{SESSION_TAG}"
    asyncio.run(_pg("postgres", f'CREATE DATABASE "{name}"'))
    try:
        yield name
    finally:
        asyncio.run(_pg("postgres", f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def postgres_url(postgres_database: str) -> str:
    asyncio.run(_pg(postgres_database, "DROP TABLE IF EXISTS orders", PG_ORDERS_TABLE))
    return f"postgresql+asyncpg://postgres@127.0.0.1:5432/{postgres_database}"


@pytest.fixture
def env(redis_url: str, use_env: Callable[..., dict[str, str]]) -> Callable[..., dict[str, str]]:
    def make(**extra: str) -> dict[str, str]:
        return use_env(redis_url, app="tests.apps.lifespan_app:create_app", **extra)

    return make


def _emit_all(calls: list[tuple[str, dict[str, Any]]]) -> None:
    """Emit from this process as a web process would (without running the app's lifespan here)."""
    emitter = create_app().event_emitter
    assert isinstance(emitter, CeleryEventEmitter)
    emitter.start()
    try:
        for event_id, kwargs in calls:
            emitter.emit(event_id, **kwargs)
    finally:
        assert emitter.stop() == 0


def _pids(records: Path, name: str) -> set[int]:
    return {run["pid"] for run in runs_of(records, name)}


@pytest.mark.parametrize("pool", [*POOLS, "asyncio"])
def test_listeners_use_what_the_apps_start_up_made_and_shutdown_runs_at_sigterm(
    pool: str, env: Callable[..., dict[str, str]], sqlite_url: str, tmp_path: Path
) -> None:
    asyncio_pool = pool == "asyncio"  # async_concurrency=8 in the config, no pool flag
    values = env(DB_URL=sqlite_url, ASYNC_CONCURRENCY="8" if asyncio_pool else "")
    extra = ["--concurrency", "8"] if asyncio_pool else POOLS[pool]
    records = Path(values["RECORD_FILE"])
    calls = [(event, {arg: make(i)}) for event, (arg, make, _) in ROWS.items() for i in range(TIMES)]
    calls += [("order_placed", {"order_id": i, "amount": 10.0 * i}) for i in range(1, TIMES + 1)]
    calls += [("order_counted", {"label": f"n{i}"}) for i in range(TIMES)]
    with celery_worker(values, tmp_path / "worker.log", queues=values["TEST_QUEUE"], extra=extra) as worker:
        _emit_all(calls)
        expected = [*ROWS, "save_order", "count_orders_sync"]
        wait_for(
            lambda: all(len(runs_of(records, name)) >= TIMES for name in expected),
            timeout=60,
            what="every listener 4 times",
        )
        started = _pids(records, "startup")
        main_pid = worker.proc.pid
    log = worker.output()
    for event, (_, _, result) in ROWS.items():
        runs = runs_of(records, event)
        assert sorted(str(r["kwargs"]["result"]) for r in runs) == sorted(str(result(i)) for i in range(TIMES)), log
        assert {r["pid"] for r in runs} <= started, "a listener ran in a process whose start-up did not run"
    assert "Traceback" not in log, log
    # advanced-alchemy's db_session, committed per listener call; the generator dependency cleaned up.
    assert _sqlite_orders(sqlite_url) == [(i, round(10.0 * i * 1.2, 2)) for i in range(1, TIMES + 1)]
    assert len(runs_of(records, "audit_cleanup")) == TIMES
    assert {r["kwargs"]["tax_rate"] for r in runs_of(records, "count_orders_sync")} == {0.2}
    # Where start-up ran: each prefork child (never the main process), else the main process.
    if pool == "prefork":
        assert len(started) == 2 and main_pid not in started, started
    else:
        assert started == {main_pid}
    assert _pids(records, "worker_startup") == started
    # SIGTERM (celery_worker's stop): every process that started ran its shutdown side.
    for name in ("worker_shutdown", "pool_closed", "shutdown"):
        assert _pids(records, name) == started, (name, log)


def test_db_session_on_postgresql_commits_each_call_rolls_back_a_failed_one_and_fails_a_failed_commit(
    env: Callable[..., dict[str, str]], postgres_url: str, postgres_database: str, tmp_path: Path
) -> None:
    values = env(DB_URL=postgres_url)
    records = Path(values["RECORD_FILE"])
    calls = [("order_placed", {"order_id": i, "amount": 100.0}) for i in (-1, 1, 2, 3, 4)]
    with celery_worker(values, tmp_path / "worker.log", queues=values["TEST_QUEUE"]) as worker:
        _emit_all(calls)
        wait_for(lambda: len(runs_of(records, "save_order")) >= TIMES, timeout=60, what="4 committed orders")
        wait_for(lambda: worker.output().count("failed for good") >= 1, timeout=30, what="the refused order")
        _emit_all([("order_placed", {"order_id": 2, "amount": 5.0})])  # a second row for order 2: COMMIT fails
        wait_for(lambda: worker.output().count("failed for good") >= 2, timeout=30, what="the failed commit")
    (rows,) = asyncio.run(_pg(postgres_database, "SELECT id, total FROM orders ORDER BY id"))
    assert [(row["id"], row["total"]) for row in rows] == [(i, 120.0) for i in range(1, 5)]
    log = worker.output()
    assert "negative order ids are refused" in log
    failures = [line for line in log.splitlines() if "failed for good" in line]
    assert any("one_row_per_order" in line and "after 2 attempt(s)" in line for line in failures), failures


@pytest.mark.parametrize("pool", list(POOLS))
def test_a_start_up_that_raises_stops_the_worker_with_the_error(
    pool: str, env: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    values = env(FAIL_STARTUP="1")
    args = ["worker", "--loglevel", "INFO", "--concurrency", "2", "--without-gossip", "--without-mingle"]
    args += ["--hostname", f"fail-{uuid.uuid4().hex[:8]}@%h", "--queues", values["TEST_QUEUE"], *POOLS[pool]]
    worker = CeleryProcess(args, values, tmp_path / "worker.log")
    try:
        worker.proc.wait(60)
    finally:
        worker.stop()
    output = worker.output()
    assert worker.proc.returncode != 0, output
    assert "RuntimeError: cannot reach the billing API at start-up" in output, output
    assert not runs_of(Path(values["RECORD_FILE"]), "worker_startup")


def test_a_start_up_longer_than_celerys_4s_child_timeout_is_waited_for(
    env: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    values = env(STARTUP_DELAY_S="5")
    records = Path(values["RECORD_FILE"])
    with celery_worker(values, tmp_path / "worker.log", queues=values["TEST_QUEUE"]) as worker:
        _emit_all([("uses_module_global", {"to": f"user{i}@example.com"}) for i in range(TIMES)])
        wait_for(lambda: len(runs_of(records, "uses_module_global")) >= TIMES, timeout=60, what="4 runs")
        # Both children finish their 5 s start-up (on a loaded machine, after the 4 runs are done).
        wait_for(lambda: len(_pids(records, "startup")) >= 2, timeout=60, what="both children's start-up")
    assert len(_pids(records, "startup")) == 2, worker.output()  # never killed and replaced
    assert "Timed out waiting for UP message" not in worker.output()


def test_the_opt_out_runs_only_the_workers_own_hooks(env: Callable[..., dict[str, str]], tmp_path: Path) -> None:
    values = env(WORKER_LIFESPAN="0")
    records = Path(values["RECORD_FILE"])
    with celery_worker(values, tmp_path / "worker.log", queues=values["TEST_QUEUE"], extra=POOLS["solo"]):
        wait_for(lambda: runs_of(records, "worker_startup"), what="the worker's own start-up hook")
    assert not runs_of(records, "startup")
    assert len(runs_of(records, "worker_shutdown")) == 1


def test_inline_events_inside_a_test_client_on_postgresql_use_the_listeners_own_session_maker(
    env: Callable[..., dict[str, str]], postgres_url: str, postgres_database: str
) -> None:
    """advanced-alchemy keeps one engine per config object: the README says to enter the client first."""
    from litestar.testing import TestClient

    from litestar_celery_events.testing import inline_events

    env(DB_URL=postgres_url)
    app = create_app()
    with TestClient(app), inline_events(app) as events:
        for order_id in (1, 2, 3):
            app.emit("order_placed", order_id=order_id, amount=10.0)
    events.assert_ran("save_order", times=3)
    (rows,) = asyncio.run(_pg(postgres_database, "SELECT id FROM orders ORDER BY id"))
    assert [row["id"] for row in rows] == [1, 2, 3]
