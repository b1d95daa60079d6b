"""Events that follow the database transaction, end to end: a real uvicorn running the docs' handler on
advanced-alchemy with autocommit, a real ``celery -A worker worker`` whose listener looks the user up in
its own session, PostgreSQL (asyncpg and psycopg, a database per session) and SQLite (aiosqlite).
"""

from __future__ import annotations

import json
import re
import signal
import sys
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from tests.helpers import LoggedProcess, celery_worker, free_port, port_open, read_records, wait_for

pytestmark = pytest.mark.integration

LISTENER = "send_welcome_email_handler"


@pytest.fixture(params=["postgresql+asyncpg", "postgresql+psycopg", "sqlite+aiosqlite"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The app's async URL, with fresh tables (the docs' users, and the outbox)."""
    if request.param.startswith("sqlite"):
        url = f"sqlite+aiosqlite:///{tmp_path / 'app.sqlite3'}"
    else:
        url = f"{request.param}://postgres@127.0.0.1:5432/{request.getfixturevalue('pg_database')}"
    from advanced_alchemy.base import metadata_registry

    from litestar_celery_events.stores.outbox import outbox_table, sync_url
    from tests.apps.outbox import OutboxProfile, OutboxUser

    metadata = metadata_registry.get(None)
    tables = [OutboxProfile.__table__, OutboxUser.__table__, outbox_table(metadata)]
    engine = create_engine(sync_url(url))
    metadata.drop_all(engine, tables=tables)
    metadata.create_all(engine, tables=tables)
    engine.dispose()
    yield url


def outbox_rows(url: str) -> int:
    from litestar_celery_events.stores.outbox import DEFAULT_OUTBOX_TABLE, sync_url

    engine = create_engine(sync_url(url))
    try:
        with engine.connect() as conn:
            return int(conn.execute(text(f"SELECT count(*) FROM {DEFAULT_OUTBOX_TABLE}")).scalar_one())
    finally:
        engine.dispose()


class Web:
    """A real uvicorn serving the docs' handler."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        argv = [sys.executable, "-m", "uvicorn", "tests.apps.outbox:create_app", "--factory"]
        argv += ["--port", str(self.port), "--log-level", "warning", "--no-access-log"]
        self.process = LoggedProcess(argv, env, log)
        wait_for(self._up, timeout=60, what="uvicorn")

    def _up(self) -> bool:
        if self.process.proc.poll() is not None:
            raise RuntimeError(f"uvicorn exited:\n{self.process.output()}")
        return port_open(self.port)

    def post(self, email: str, mode: str = "ok") -> int:
        import httpx

        body = {"email": email, "mode": mode}
        return httpx.post(f"http://127.0.0.1:{self.port}/users", json=body, timeout=30).status_code


@pytest.fixture
def run(
    use_env: Callable[..., dict[str, str]], redis_url: str, database_url: str, tmp_path: Path
) -> Iterator[Callable[..., tuple[dict[str, str], Web]]]:
    """Start the worker and the web process for the docs' app (``OUTBOX=1`` or ``0``)."""
    stack: list[Any] = []

    def start(outbox: bool = True, **extra: str) -> tuple[dict[str, str], Web]:
        env = use_env(
            redis_url, app="tests.apps.outbox:create_app", OUTBOX_DB_URL=database_url, OUTBOX="1" if outbox else "0"
        )
        worker = celery_worker({**env, **extra.pop("worker_env", {})}, tmp_path / "worker.log", env["TEST_QUEUE"])
        stack.append(worker)
        worker.__enter__()
        web = Web({**env, **extra}, tmp_path / "web.log")
        stack.append(web.process)
        return env, web

    yield start
    for item in reversed(stack):
        if isinstance(item, LoggedProcess):
            item.stop()
        else:
            item.__exit__(None, None, None)


def runs(env: dict[str, str]) -> list[dict[str, Any]]:
    return [r for r in read_records(Path(env["RECORD_FILE"])) if r.get("listener") == LISTENER]


def wait_runs(env: dict[str, str], count: int, timeout: float = 90.0) -> list[dict[str, Any]]:
    return list(wait_for(lambda: (found := runs(env)) and len(found) >= count and found, timeout, f"{count} runs"))


def test_with_the_outbox_every_listener_run_finds_its_row_sequential_and_concurrent(
    run: Callable[..., tuple[dict[str, str], Web]], database_url: str
) -> None:
    env, web = run()
    emails = [f"seq-{n}-{uuid.uuid4().hex[:6]}@example.com" for n in range(150)]
    assert all(web.post(email) == 201 for email in emails)
    concurrent = [f"con-{n}-{uuid.uuid4().hex[:6]}@example.com" for n in range(150)]
    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(web.post, concurrent)) == {201}
    found = wait_runs(env, len(emails) + len(concurrent))
    assert sorted(r["email"] for r in found) == sorted(emails + concurrent), "each event delivered exactly once"
    missing = [r["email"] for r in found if not r["found"]]
    assert missing == [], f"{len(missing)} listener runs did not find their user"
    wait_for(lambda: outbox_rows(database_url) == 0, timeout=10, what="the outbox rows to be cleared")
    # One relay per worker (its main process), not one per pool child.
    worker_log = (Path(env["RECORD_FILE"]).parent / "worker.log").read_text()
    assert len(re.findall(r"outbox: process \d+ relays rows", worker_log)) == 1, worker_log[-3000:]


@pytest.mark.parametrize("database_url", ["postgresql+asyncpg", "sqlite+aiosqlite"], indirect=True)
@pytest.mark.parametrize("outbox", [True, False], ids=["outbox", "plain-emit"])
def test_a_rolled_back_or_failed_commit_delivers_no_event(
    run: Callable[..., tuple[dict[str, str], Web]], database_url: str, outbox: bool
) -> None:
    env, web = run(outbox=outbox)
    raised = [f"raise-{n}@example.com" for n in range(40)]
    failed = [f"fk-{n}@example.com" for n in range(40)]
    assert {web.post(email, "raise") for email in raised} == {500}
    # advanced-alchemy's autocommit logs the failed COMMIT at debug level and still answers 201.
    assert {web.post(email, "bad_fk") for email in failed} == {201}
    web.post("last@example.com")  # delivered after the others: the worker has seen everything before it
    delivered = wait_runs(env, 1 if outbox else 81)
    wait_for(lambda: any(r["email"] == "last@example.com" for r in runs(env)), timeout=60, what="the last event")
    ghosts = [r for r in runs(env) if r["email"] != "last@example.com"]
    if outbox:
        assert ghosts == [], f"{len(ghosts)} events delivered for transactions that did not commit"
        wait_for(lambda: outbox_rows(database_url) == 0, timeout=10, what="the outbox rows to be cleared")
    else:  # without the outbox: every one of them goes out, for users that do not exist
        assert len(ghosts) == len(raised) + len(failed)
        assert not any(r["found"] for r in ghosts)
    assert delivered


@pytest.mark.parametrize("database_url", ["postgresql+asyncpg", "sqlite+aiosqlite"], indirect=True)
def test_a_web_process_killed_right_after_its_commit_loses_no_event(
    run: Callable[..., tuple[dict[str, str], Web]], database_url: str, tmp_path: Path
) -> None:
    env, web = run(KILL_AFTER_COMMIT="1", OUTBOX_RELAY_AFTER_S="2", worker_env={"OUTBOX_RELAY_AFTER_S": "2"})
    import httpx

    with pytest.raises(httpx.HTTPError):  # the process dies between COMMIT and publishing
        web.post("survivor@example.com")
    web.process.proc.wait(10)
    assert web.process.proc.returncode == -signal.SIGKILL
    assert outbox_rows(database_url) == 1, "the committed event waits in its outbox row"
    assert runs(env) == []
    (found,) = wait_runs(env, 1, timeout=60)  # the worker's relay takes the row once its lease ran out
    assert found["email"] == "survivor@example.com"
    assert found["found"] is True
    wait_for(lambda: outbox_rows(database_url) == 0, timeout=10, what="the relayed row to be deleted")
    log = (tmp_path / "worker.log").read_text()
    assert "outbox: relayed 1 event(s)" in log, log[-3000:]
    assert json.dumps(found)  # the record is plain JSON


@pytest.mark.parametrize("database_url", ["postgresql+asyncpg"], indirect=True)
def test_an_emission_published_again_after_its_listener_completed_does_not_run_it_again(
    run: Callable[..., tuple[dict[str, str], Web]], tmp_path: Path
) -> None:
    env, _ = run()
    from litestar_celery_events.emitter import emitter_of
    from litestar_celery_events.transports import transport_for
    from tests.apps.outbox import create_app

    emitter = emitter_of(create_app())
    emitter.start()
    try:
        emission = emitter.prepare("user_created", (), {"email": "twice@example.com"})
        transport = transport_for(emitter.celery_app)
        transport.publish([emission], [0])
        wait_runs(env, 1)
        transport.publish([emission], [0])  # what a relay sends for a row whose owner published and then died
        transport.close()
        wait_for(lambda: "already completed" in (tmp_path / "worker.log").read_text(), timeout=60, what="the skip")
    finally:
        emitter.stop()
    assert [r["email"] for r in runs(env)] == ["twice@example.com"]


def test_relays_racing_on_postgresql_claim_each_orphaned_row_exactly_once(pg_database: str) -> None:
    """``FOR UPDATE SKIP LOCKED`` plus the lease compare-and-set: three relays, each row to one of them."""
    import threading
    import time

    from sqlalchemy import MetaData

    from litestar_celery_events.contract.message import Emission
    from litestar_celery_events.stores.outbox import OutboxStore, outbox_table, write_rows

    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{pg_database}"
    table = outbox_table(MetaData(), "race_outbox")
    stores = [OutboxStore.from_url(url, table) for _ in range(3)]
    table.drop(stores[0].engine, checkfirst=True)
    table.create(stores[0].engine)
    body = b'[[],{"n":1},{"callbacks":null,"errbacks":null,"chain":null,"chord":null}]'
    emissions = [
        Emission("e", uuid.uuid4().hex, "events.e", body, (), {"n": 1}, emitted_at=time.time()) for _ in range(3000)
    ]
    with stores[0].engine.begin() as conn:
        write_rows(conn, table, emissions, "dead-host:1:abc", lease_s=-1.0)
    claimed: list[list[str]] = [[], [], []]

    def relay(index: int) -> None:
        now = time.time()
        while batch := stores[index].claim(f"relay-{index}", now, now + 60, limit=100):
            claimed[index].extend(c.emission.emission_id for c in batch)

    threads = [threading.Thread(target=relay, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    everything = [emission_id for part in claimed for emission_id in part]
    assert len(everything) == len(set(everything)) == 3000, "no row claimed twice, none left"
    assert stores[0].status().overdue == 0
    table.drop(stores[0].engine)
    for store in stores:
        store.close()
