"""Differential: over each Redis connection Celery can make, the library gets through as stock Celery does.

Each row configures a real redis-server variant (TLS with CERT_NONE, a CA file or client
certificates; the ``rediss://`` query spelling; a password; an ACL user; a unix socket; Sentinel;
a failover list whose first server is down; kombu's transport options) through ``celery_config``
and through a brought Celery app. One event goes through the library, one through stock Celery's
``send_task`` with the same settings; a real ``celery -A worker worker`` must run both. Over the
same connection, ``emit_later`` waits in the broker's store and is moved when due, and a failing
listener lands in the failed-events store.
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import TestClient

from litestar_celery_events import CeleryEventEmitter, emit_later
from litestar_celery_events.brokers import BrokerSettingError
from litestar_celery_events.stores.schedule import RedisScheduleStore
from litestar_celery_events.stores.state import failed_store_for, schedule_store_for, state_store_of
from tests.apps.connections import BRING_APP_ENV, SETTINGS_ENV, create_app, stock_celery_app
from tests.helpers import CeleryProcess, celery_worker, free_port, runs_of, wait_for
from tests.redis_servers import ACL_PASSWORD, ACL_USER, DEFAULT_PASSWORD, Certs, Sentinels

pytestmark = pytest.mark.integration

APP = "tests.apps.connections:create_app"
DELAY_S = 3.0


@dataclass(frozen=True)
class Row:
    """A broker URL and Celery settings, made from the session's servers."""

    make: Callable[[pytest.FixtureRequest], tuple[str, dict[str, Any]]]


def _tls(request: pytest.FixtureRequest, mutual: bool = False) -> tuple[int, Certs]:
    port = request.getfixturevalue("mtls_redis_port" if mutual else "tls_redis_port")
    return int(port), request.getfixturevalue("tls_certs")


def _tls_cert_none(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    port, _ = _tls(request)
    return f"rediss://127.0.0.1:{port}/0", {"broker_use_ssl": {"ssl_cert_reqs": ssl.CERT_NONE}}


def _tls_ca_file(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    port, certs = _tls(request)
    tls = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": str(certs.ca)}
    return f"rediss://127.0.0.1:{port}/0", {"broker_use_ssl": tls}


def _mutual_tls(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    port, certs = _tls(request, mutual=True)
    tls = {
        "ssl_cert_reqs": ssl.CERT_REQUIRED,
        "ssl_ca_certs": str(certs.ca),
        "ssl_certfile": str(certs.client_cert),
        "ssl_keyfile": str(certs.client_key),
    }
    return f"rediss://127.0.0.1:{port}/0", {"broker_use_ssl": tls}


def _rediss_query(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    port, _ = _tls(request)
    return f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=CERT_NONE", {}


def _password(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    port = request.getfixturevalue("auth_redis_port")
    return f"redis://:{DEFAULT_PASSWORD}@127.0.0.1:{port}/0", {}


def _acl_user(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    port = request.getfixturevalue("auth_redis_port")
    return f"redis://{ACL_USER}:{ACL_PASSWORD}@127.0.0.1:{port}/1", {}


def _unix_socket(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    path: Path = request.getfixturevalue("unix_redis_socket")
    return f"redis+socket://{path}", {}


def _sentinel(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    group: Sentinels = request.getfixturevalue("sentinel_redis")
    urls = f"sentinel://127.0.0.1:{free_port()};sentinel://127.0.0.1:{group.sentinel_port}"  # the first is down
    return urls, {"broker_transport_options": {"master_name": group.master_name}}


def _failover(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    up = request.getfixturevalue("redis_url")
    return f"redis://127.0.0.1:{free_port()}/0;{up}", {}


def _transport_options(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    options = {
        "socket_timeout": 5.0,
        "socket_connect_timeout": 2.0,
        "socket_keepalive": True,
        "health_check_interval": 5,
        "max_connections": 20,
        "global_keyprefix": "tenant7:",
    }
    return request.getfixturevalue("redis_url"), {"broker_transport_options": options}


ROWS = {
    "tls-cert-none": Row(_tls_cert_none),
    "tls-ca-file": Row(_tls_ca_file),
    "mutual-tls": Row(_mutual_tls),
    "rediss-query-cert-none": Row(_rediss_query),
    "password": Row(_password),
    "acl-user": Row(_acl_user),
    "unix-socket": Row(_unix_socket),
    "sentinel": Row(_sentinel),
    "failover-first-down": Row(_failover),
    "transport-options": Row(_transport_options),
}


def _emitter(app: Litestar) -> CeleryEventEmitter:
    emitter = app.event_emitter
    assert isinstance(emitter, CeleryEventEmitter)
    return emitter


# One variant of each connection joins the lowest-versions run (`redis`): old kombu and redis-py differ here.
@pytest.mark.parametrize(
    "brought", [pytest.param(False, marks=pytest.mark.redis), True], ids=["celery_config", "brought_app"]
)
@pytest.mark.parametrize("row", list(ROWS), ids=list(ROWS))
def test_events_travel_over_every_connection_stock_celery_makes(
    row: str,
    brought: bool,
    request: pytest.FixtureRequest,
    use_env: Callable[..., dict[str, str]],
    tmp_path: Path,
) -> None:
    url, settings = ROWS[row].make(request)
    env = use_env(url, app=APP, **{SETTINGS_ENV: json.dumps(settings), BRING_APP_ENV: "1" if brought else ""})
    records = Path(env["RECORD_FILE"])
    app = create_app()
    emitter = _emitter(app)
    failed = failed_store_for(emitter.config, emitter.celery_app)
    delayed = schedule_store_for(state_store_of(emitter.config, emitter.celery_app), emitter.celery_app)
    assert isinstance(delayed, RedisScheduleStore), "every Redis connection has the broker-side delayed store"
    try:
        failed.purge()
        with TestClient(app):
            # Delayed first: its delay passes while the worker starts.
            due = time.time() + DELAY_S
            emit_later(app, "conn_ping", delay=DELAY_S, n=2)
            wait_for(lambda: delayed.waiting() >= 1, timeout=DELAY_S - 1, what="the delayed event in the store")
            with celery_worker(env, tmp_path / "worker.log", queues=env["TEST_QUEUE"]) as worker:
                app.emit("conn_ping", n=1)
                app.emit("conn_fails", n=3)
                stock_celery_app().send_task("events.conn_ping", kwargs={"n": 4}, queue=env["TEST_QUEUE"])
                wait_for(lambda: len(runs_of(records, "conn_ping")) >= 3, timeout=30, what="every conn_ping run")
                wait_for(failed.count, timeout=20, what="the failing listener's record")
                # The session's Sentinel group runs without min-replicas-to-write: the worker says what that risks.
                assert ("min-replicas-to-write 0" in worker.output()) is (row == "sentinel")
        runs = {run["kwargs"]["n"]: run for run in runs_of(records, "conn_ping")}
        assert sorted(runs) == [1, 2, 4], "library emit, emit_later and stock send_task each ran once"
        assert runs[2]["kwargs"]["at"] >= due - 0.05, "the delayed event ran when due, not before"
        assert delayed.waiting() == 0
        [record] = failed.records(event_id="conn_fails")
        assert record["kwargs"] == {"n": 3}
        assert record["exc_type"] == "builtins.RuntimeError"
    finally:
        failed.purge()
        failed.close()
        delayed.close()


def test_a_setting_the_library_cannot_honour_stops_the_app_and_the_worker_naming_it(
    request: pytest.FixtureRequest, use_env: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    port, _ = _tls(request)
    # kombu's Redis transport ignores broker_use_ssl=True and speaks clear text to a TLS port.
    env = use_env(f"rediss://127.0.0.1:{port}/0", app=APP, **{SETTINGS_ENV: json.dumps({"broker_use_ssl": True})})
    with pytest.raises(BrokerSettingError, match="broker_use_ssl"):
        create_app()
    worker = CeleryProcess(["worker", "--loglevel", "INFO"], env, tmp_path / "worker.log")
    try:
        wait_for(lambda: worker.proc.poll() is not None, timeout=60, what="the worker to refuse to start")
    finally:
        worker.stop()
    assert worker.proc.returncode != 0
    assert "BrokerSettingError" in worker.output()
    assert "broker_use_ssl" in worker.output()
