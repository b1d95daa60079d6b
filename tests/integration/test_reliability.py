"""Nothing lost: exhausted retries, hostile messages, worker crashes and a web process killed
during a broker outage, each against real brokers and real ``celery -A worker worker`` processes.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from kombu import Connection, Exchange, Producer, Queue
from litestar import Litestar
from litestar.cli.main import litestar_group
from litestar.testing import TestClient

from litestar_celery_events import CeleryEventEmitter
from litestar_celery_events.contract.message import Emission, task_headers
from litestar_celery_events.stores.failed import FailedStore
from litestar_celery_events.stores.state import failed_store_for
from tests.apps.reliability import create_app
from tests.helpers import (
    ROOT,
    CeleryProcess,
    celery_worker,
    free_port,
    port_open,
    redis_server_binary,
    runs_of,
    wait_for,
)

pytestmark = pytest.mark.integration

APP = "tests.apps.reliability:create_app"


@pytest.fixture
def env(broker_url: str, use_env: Callable[..., dict[str, str]]) -> dict[str, str]:
    return use_env(broker_url, APP)


@pytest.fixture
def app(env: dict[str, str]) -> Litestar:
    return create_app()


@pytest.fixture
def store(app: Litestar) -> Iterator[FailedStore]:
    made = failed_store_for(_emitter(app).config, _emitter(app).celery_app)
    made.purge()
    yield made
    made.close()


@pytest.fixture
def worker(env: dict[str, str], tmp_path: Path) -> Iterator[CeleryProcess]:
    with celery_worker(env, tmp_path / "worker.log", queues=os.environ["TEST_QUEUE"]) as process:
        yield process


def _emitter(app: Litestar) -> CeleryEventEmitter:
    emitter = app.event_emitter
    assert isinstance(emitter, CeleryEventEmitter)
    return emitter


def _cli(*args: str) -> Any:
    result = CliRunner().invoke(litestar_group, ["--app", APP, "events", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _records_of(store: FailedStore, emission_id: str) -> list[dict[str, Any]]:
    return [r for r in store.records() if r["emission_id"] == emission_id]


def test_exhausted_retries_land_in_the_failed_store_and_a_replay_reruns_only_that_listener(
    app: Litestar, worker: CeleryProcess, store: FailedStore, env: dict[str, str]
) -> None:
    records = Path(env["RECORD_FILE"])
    with TestClient(app):
        emission_id = _emitter(app).enqueue("doomed", n=42)

    [record] = wait_for(lambda: _records_of(store, emission_id), timeout=30, what="the failed-event record")
    assert record["event_id"] == "doomed"
    assert record["listener"] == "tests.apps.reliability.doomed"
    assert record["kwargs"] == {"n": 42}
    assert record["exc_type"] == "builtins.RuntimeError"
    assert record["message"] == "payment provider rejected order 42"
    assert "RuntimeError: payment provider rejected order 42" in record["traceback"]
    assert record["attempts"] == 2  # 1 + max_retries
    assert record["permanent"] is False
    assert record["failed_at"] >= record["emitted_at"] > 0
    assert len(runs_of(records, "doomed:attempt")) == 2

    listed = json.loads(_cli("failed", "list", "--json", "--event", "doomed", "--listener", "doomed"))
    assert [r["id"] for r in listed] == [record["id"]]
    assert json.loads(_cli("failed", "list", "--json", "--event", "other")) == []
    assert f'"emission_id": "{emission_id}"' in _cli("failed", "show", record["id"])
    status = _cli("status")
    assert "failed events: 1" in status
    assert ":guest@" not in status + worker.output(), "broker passwords never reach output"

    Path(env["RECORD_FILE"]).with_suffix(".doomed-fixed").touch()
    assert f"replayed {record['id']}" in _cli("failed", "replay", record["id"])
    wait_for(lambda: runs_of(records, "doomed"), timeout=30, what="the replayed listener to succeed")
    assert store.count() == 0
    assert len(runs_of(records, "doomed_sibling")) == 1, "a replay re-runs the failed listener only"
    assert "purged 0 failed event(s)" in _cli("failed", "purge")


@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
def test_hostile_and_malformed_messages_run_nothing_are_recorded_and_the_worker_keeps_going(
    app: Litestar, worker: CeleryProcess, store: FailedStore, env: dict[str, str], tmp_path: Path
) -> None:
    records = Path(env["RECORD_FILE"])
    marker = tmp_path / "pwned"
    queue_name = os.environ["TEST_QUEUE"]
    config = _emitter(app).config

    class CreatesAFile:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.makedirs, (str(marker),))

    def raw(task: str, body: bytes, content_type: str, event_id: str = "echo") -> str:
        emission = Emission(event_id, str(uuid.uuid4()), task, body, (), {}, emitted_at=1.0)
        with Connection(env["CELERY_BROKER_URL"]) as connection:
            queue = Queue(queue_name, Exchange(queue_name), routing_key=queue_name)
            Producer(connection.default_channel).publish(
                body,
                exchange=queue.exchange,
                routing_key=queue_name,
                declare=[queue],
                headers=task_headers(emission, "hostile-test"),
                content_type=content_type,
                content_encoding="binary" if content_type != "application/json" else "utf-8",
                serializer=None,
            )
        return emission.emission_id

    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    pickled = raw("events.echo", pickle.dumps(((CreatesAFile(),), {}, embed)), "application/x-python-serialize")
    unknown_task = raw("events.nobody_listens", json.dumps([[], {"x": 1}, embed]).encode(), "application/json")
    garbage = raw("events.echo", b"[[1], {not json", "application/json")
    with TestClient(app):
        emitter = _emitter(app)
        ghost = Emission.create("echo", "events.echo", (), {"x": 1}, max_payload_bytes=10_000, queue=queue_name)
        ghost.listeners = ("os.system",)
        emitter.submit(ghost)
        # Bypasses emit's own check, as a stale web process would: the worker checks again.
        mismatch = Emission.create("strict", "events.strict", (), {"a": 1, "b": 2}, max_payload_bytes=10_000)
        mismatch.queue = queue_name
        emitter.submit(mismatch)
        emitter.enqueue("echo", "still alive")

    wait_for(lambda: runs_of(records, "echo"), timeout=30, what="a valid event after the hostile ones")
    expected = {pickled, unknown_task, garbage, ghost.emission_id, mismatch.emission_id}
    wait_for(lambda: expected <= {r["emission_id"] for r in store.records()}, timeout=30, what="five records")
    by_emission = {r["emission_id"]: r for r in store.records()}

    assert not marker.exists(), "a pickle payload must never be deserialised"
    assert by_emission[pickled]["exc_type"] == "kombu.exceptions.ContentDisallowed"
    assert by_emission[pickled]["args"] == []
    assert by_emission[unknown_task]["exc_type"] == "celery.exceptions.NotRegistered"
    assert by_emission[unknown_task]["kwargs"] == {"x": 1}
    assert by_emission[garbage]["exc_type"].startswith("kombu.exceptions.")
    assert by_emission[ghost.emission_id]["listener"] == "os.system"
    assert "no registered listener 'os.system'" in by_emission[ghost.emission_id]["message"]
    strict = by_emission[mismatch.emission_id]
    assert strict["permanent"] is True
    assert strict["attempts"] == 1, "a signature mismatch is never retried"
    assert "unexpected keyword argument(s) ['b']" in strict["message"]
    assert all(r["permanent"] for r in by_emission.values())
    assert [r["args"] for r in runs_of(records, "echo")] == [[["str", "'still alive'"]]]
    assert not runs_of(records, "strict_listener")
    assert worker.proc.poll() is None
    assert config.task_name_prefix == "events"


def test_a_worker_child_killed_mid_listener_is_redelivered_and_completes(
    app: Litestar, worker: CeleryProcess, env: dict[str, str]
) -> None:
    records = Path(env["RECORD_FILE"])
    with TestClient(app):
        app.emit("slow_job", seconds=2)

    [started] = wait_for(lambda: runs_of(records, "slow_listener:start"), timeout=30, what="the listener to start")
    os.kill(started["pid"], signal.SIGKILL)
    wait_for(lambda: runs_of(records, "slow_listener:done"), timeout=60, what="the redelivered run to complete")
    assert len(runs_of(records, "slow_listener:done")) == 1
    assert len(runs_of(records, "slow_listener:start")) == 2
    assert runs_of(records, "slow_listener:done")[0]["pid"] != started["pid"]
    assert worker.proc.poll() is None


@pytest.fixture
def dead_broker_port(tmp_path: Path) -> Iterator[tuple[int, Any]]:
    """A port with no broker yet, and a function that starts a redis-server on it."""
    port = free_port()
    started: list[subprocess.Popen[bytes]] = []

    def start() -> None:
        started.append(
            subprocess.Popen(
                [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                cwd=tmp_path,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        wait_for(lambda: port_open(port), timeout=10, what="the late redis-server")

    yield port, start
    for proc in started:
        proc.terminate()
        proc.wait(10)


WEB_PROCESS = """
import os, signal, sys, time
sys.path.insert(0, {root!r})
from litestar.testing import TestClient
from tests.apps.reliability import create_app

app = create_app()
with TestClient(app):
    publisher = app.event_emitter.publisher
    n, deadline = 0, time.monotonic() + 30
    while publisher.spooled == 0 and time.monotonic() < deadline:  # until the outage is noticed
        app.emit("echo", n=n)
        n += 1
        time.sleep(0.02)
    for n in range(n, {count}):
        app.emit("echo", n=n)
    print("emitted", publisher.spooled, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
@pytest.mark.parametrize("outage", ["refuses", "hangs"])
def test_a_web_process_killed_during_an_outage_loses_no_event(
    env: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    dead_broker_port: tuple[int, Any],
    outage: str,
    request: pytest.FixtureRequest,
) -> None:
    port, start_broker = dead_broker_port
    blackhole = socket.socket()
    request.addfinalizer(blackhole.close)
    if outage == "hangs":  # connections are accepted by the kernel and never answered
        blackhole.bind(("127.0.0.1", port))
        blackhole.listen(16)
    monkeypatch.setenv("CELERY_BROKER_URL", f"redis://127.0.0.1:{port}/0")
    monkeypatch.setenv("SPOOL", "1")
    count = 300
    web = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(WEB_PROCESS.format(root=str(ROOT), count=count))],
        cwd=ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert web.returncode == -signal.SIGKILL, web.stderr
    assert f"emitted {count}" in web.stdout
    assert f"spooled events (waiting for the broker): {count}" in _cli("status")

    blackhole.close()
    start_broker()
    records = Path(env["RECORD_FILE"])
    worker_env = {**env, "CELERY_BROKER_URL": f"redis://127.0.0.1:{port}/0"}
    with celery_worker(worker_env, tmp_path / "worker.log", queues=os.environ["TEST_QUEUE"]):
        restarted = create_app()
        with TestClient(restarted):  # the next web process adopts the dead one's spool
            wait_for(lambda: _emitter(restarted).publisher.spooled == 0, timeout=30, what="the spool to drain")
        wait_for(lambda: len(runs_of(records, "echo")) >= count, timeout=60, what="every spooled event")
    seen = sorted(r["kwargs"]["n"][1] for r in runs_of(records, "echo"))
    assert seen == sorted(str(n) for n in range(count)), "each spooled event delivered exactly once"
    assert not list((Path(env["CELERY_EVENTS_DATA_DIR"]) / "spool").glob("*.sqlite3"))


@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
def test_bad_input_reaching_a_worker_has_a_defined_outcome(
    app: Litestar, worker: CeleryProcess, store: FailedStore, env: dict[str, str]
) -> None:
    import datetime
    import decimal

    records = Path(env["RECORD_FILE"])
    when = datetime.datetime(2026, 11, 23, 12, 30, tzinfo=datetime.timezone.utc)
    ident = uuid.UUID("12345678-1234-5678-1234-567812345678")
    with TestClient(app):
        emitter = _emitter(app)
        hang_id = emitter.enqueue("hang", seconds=30)
        emitter.enqueue("returns", n=3)
        emitter.enqueue(
            "echo",
            None,
            b"\x00\xffbytes",
            when=when,
            ident=ident,
            price=decimal.Decimal("19.99"),
            nested={"list": [1, {"deep": [None, True, 1.5]}], "ünïcode": "✓"},
        )
        emitter.enqueue("commande_passée_✓", n=1)
        emitter.enqueue("e" * 200, n=2)

    wait_for(lambda: len(runs_of(records, "echo")) >= 3, timeout=30, what="the echo runs")
    wait_for(lambda: runs_of(records, "returns_value"), timeout=30, what="the listener returning a value")
    [typed] = [r for r in runs_of(records, "echo") if r["args"]]
    assert typed["args"] == [["NoneType", "None"], ["bytes", repr(b"\x00\xffbytes")]]
    assert typed["kwargs"]["when"] == ["datetime", repr(when)]
    assert typed["kwargs"]["ident"] == ["UUID", repr(ident)]
    assert typed["kwargs"]["price"] == ["Decimal", "Decimal('19.99')"]
    assert typed["kwargs"]["nested"]["ünïcode"] == ["str", "'✓'"]
    assert sorted(r["kwargs"]["n"][1] for r in runs_of(records, "echo") if "n" in r["kwargs"]) == ["1", "2"]

    [hung] = wait_for(lambda: _records_of(store, hang_id), timeout=30, what="the hung listener's record")
    assert hung["exc_type"].endswith("TimeLimitExceeded")
    assert hung["listener"] == "tests.apps.reliability.hangs"
    assert hung["event_id"] == "hang"
    assert hung["kwargs"] == {"seconds": 30}, "a replay needs the arguments"
    assert not runs_of(records, "hangs:done")
    assert len(runs_of(records, "hangs:start")) == 1, "a hard time limit is not retried"
    assert [r for r in store.records() if r["event_id"] == "returns"] == []
    assert worker.proc.poll() is None


@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
def test_every_emission_of_a_stream_across_a_broker_pause_is_accounted_for(
    redis_url: str, store: FailedStore, env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import redis as redis_client

    monkeypatch.setenv("SPOOL", "1")
    records = Path(env["RECORD_FILE"])
    app = create_app()
    admin = redis_client.Redis.from_url(redis_url)
    doomed_ids: list[str] = []
    with celery_worker(env, tmp_path / "worker.log", queues=os.environ["TEST_QUEUE"]):
        with TestClient(app):
            emitter = _emitter(app)
            for n in range(150):
                if n == 50:
                    admin.execute_command("CLIENT", "PAUSE", 2500, "ALL")
                if n % 10 == 0:
                    doomed_ids.append(emitter.enqueue("doomed", n=n))
                emitter.enqueue("echo", n=n)
                time.sleep(0.02)
        wait_for(lambda: len(runs_of(records, "echo")) >= 150, timeout=60, what="every echo event")
        wait_for(
            lambda: {r["emission_id"] for r in store.records(event_id="doomed")} >= set(doomed_ids),
            timeout=60,
            what="every doomed event in the failed store",
        )
    echoed = Counter(int(r["kwargs"]["n"][1]) for r in runs_of(records, "echo"))
    assert set(echoed) == set(range(150)), "no emission lost"
    duplicates = sum(count - 1 for count in echoed.values())
    assert duplicates <= 50, "only a batch stalled during the pause may go out twice"
    assert len(runs_of(records, "doomed_sibling")) >= len(doomed_ids)
