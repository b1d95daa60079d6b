"""The core bridge end to end: a Litestar app emits, a real `celery -A worker worker` runs listeners."""

from __future__ import annotations

import importlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from kombu import Connection, Exchange, Queue
from kombu.exceptions import ChannelError
from litestar import Litestar
from litestar.exceptions import ImproperlyConfiguredException
from litestar.testing import TestClient

from litestar_celery_events import CeleryEventEmitter, EventPayloadError
from tests.apps.recording import create_app
from tests.helpers import CeleryProcess, celery_worker, read_records, runs_of, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def env(broker_url: str, use_env: Callable[..., dict[str, str]]) -> dict[str, str]:
    return use_env(broker_url)


@pytest.fixture
def worker(env: dict[str, str], tmp_path: Path) -> Iterator[CeleryProcess]:
    queues = f"{os.environ['TEST_QUEUE']},{os.environ['ROUTED_QUEUE']}"
    with celery_worker(env, tmp_path / "worker.log", queues=queues) as process:
        yield process


@pytest.fixture
def app(env: dict[str, str]) -> Litestar:
    return create_app()


def test_seed_examples_run_in_the_worker_process_with_the_emitted_arguments(
    app: Litestar, worker: CeleryProcess, env: dict[str, str]
) -> None:
    records = Path(env["RECORD_FILE"])
    with TestClient(app) as client:
        assert client.post("/users", json={"email": "ada@example.com"}).status_code == 201
        assert client.delete("/users/bob@example.com").status_code == 204

    expected = {
        "send_welcome_email_handler": {"email": "ada@example.com"},
        "send_email_handler": {"email": "ada@example.com", "message": "welcome"},
        "send_farewell_email_handler": {"email": "bob@example.com", "reason": "deleted"},
        "notify_customer_support": {"reason": "deleted", "email": "bob@example.com"},
    }
    wait_for(lambda: len(read_records(records)) >= len(expected), what="all seed listeners")
    time.sleep(0.5)  # anything extra (a duplicate) would show up now
    runs = read_records(records)
    assert sorted(r["listener"] for r in runs) == sorted(expected)
    for run in runs:
        assert run["kwargs"] == expected[run["listener"]]
        assert run["pid"] != os.getpid(), "listeners must run in the worker, not the web process"
    assert worker.proc.poll() is None


def test_flaky_listener_is_retried_to_success_while_its_siblings_run_exactly_once(
    app: Litestar, worker: CeleryProcess, env: dict[str, str]
) -> None:
    records = Path(env["RECORD_FILE"])
    with TestClient(app):
        app.emit("order_placed", order_id=7)

    wait_for(lambda: runs_of(records, "flaky_listener"), timeout=30, what="the flaky listener to succeed")
    wait_for(lambda: runs_of(records, "routed_listener"), what="the routed listener")
    time.sleep(1.0)
    assert len(runs_of(records, "flaky_listener:attempt")) == 3
    assert len(runs_of(records, "flaky_listener")) == 1
    assert len(runs_of(records, "steady_listener")) == 1
    assert len(runs_of(records, "routed_listener")) == 1
    log = worker.output()
    assert "events.order_placed[tests.apps.recording.flaky_listener]" in log


def test_exhausted_retries_are_reported_with_the_listener_and_emission(
    app: Litestar, worker: CeleryProcess, env: dict[str, str]
) -> None:
    records = Path(env["RECORD_FILE"])
    with TestClient(app):
        emitter = app.event_emitter
        assert isinstance(emitter, CeleryEventEmitter)
        emission_id = emitter.enqueue("always_fails", n=1)

    wait_for(lambda: "failed for good" in worker.output(), timeout=30, what="the final failure report")
    assert len(runs_of(records, "always_fails:attempt")) == 2  # 1 + max_retries
    failure_line = next(line for line in worker.output().splitlines() if "failed for good" in line)
    assert emission_id in failure_line
    assert "tests.apps.recording.always_fails" in failure_line
    assert "RuntimeError: boom 1" in failure_line


def _queue_depth(broker_url: str, queue: str) -> int:
    with Connection(broker_url) as connection:
        bound = Queue(queue, Exchange(queue), routing_key=queue)(connection.default_channel)
        bound.declare()
        try:
            return int(bound.queue_declare(passive=True).message_count)
        except ChannelError:  # kombu's Redis transport: an empty queue is no key at all
            return 0


def test_bad_input_raises_at_the_call_site_and_enqueues_nothing(env: dict[str, str]) -> None:
    app = create_app()
    queue = os.environ["TEST_QUEUE"]
    before = _queue_depth(env["CELERY_BROKER_URL"], queue)  # other tests may leave messages behind
    with TestClient(app):
        with pytest.raises(ImproperlyConfiguredException, match="no event listeners are registered for event ID"):
            app.emit("nobody_listens", x=1)
        with pytest.raises(TypeError, match=r"'user_created'.*builtins\.object") as excinfo:
            app.emit("user_created", email=object())
        assert isinstance(excinfo.value, EventPayloadError)
        emitter = app.event_emitter
        assert isinstance(emitter, CeleryEventEmitter)
        assert emitter.publisher.pending == 0
    assert emitter.publisher.published == 0
    assert _queue_depth(env["CELERY_BROKER_URL"], queue) == before


@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
def test_emit_returns_at_once_while_redis_is_paused_and_events_arrive_afterwards(
    redis_url: str, env: dict[str, str], tmp_path: Path
) -> None:
    records = Path(env["RECORD_FILE"])
    queues = f"{os.environ['TEST_QUEUE']},{os.environ['ROUTED_QUEUE']}"
    app = create_app()
    admin = redis.Redis.from_url(redis_url)
    with celery_worker(env, tmp_path / "worker.log", queues=queues), TestClient(app) as client:
        client.post("/users", json={"email": "warmup@example.com"})
        wait_for(lambda: runs_of(records, "send_welcome_email_handler"), what="warm-up event")
        admin.execute_command("CLIENT", "PAUSE", 3000, "ALL")
        paused_at = time.monotonic()
        slowest = 0.0
        for i in range(50):
            started = time.perf_counter()
            app.emit("user_created", email=f"user{i}@example.com")
            slowest = max(slowest, time.perf_counter() - started)
        assert time.monotonic() - paused_at < 1.0, "emitting must not wait for the paused broker"
        wait_for(
            lambda: len(runs_of(records, "send_welcome_email_handler")) >= 51,
            timeout=30,
            what="the events emitted during the pause",
        )
    assert slowest < 0.05, f"slowest emit took {slowest * 1000:.1f} ms during the pause"


def test_a_listener_can_emit_another_event_from_the_worker(env: dict[str, str], tmp_path: Path) -> None:
    from tests.apps import chaining

    chaining = importlib.reload(chaining)  # its module-level app reads CELERY_BROKER_URL at import
    records = Path(env["RECORD_FILE"])
    worker_env = {**env, "LITESTAR_APP": "tests.apps.chaining:app"}
    with celery_worker(worker_env, tmp_path / "worker.log", queues=os.environ["TEST_QUEUE"]):
        with TestClient(chaining.app):
            chaining.app.emit("order_paid", order_id=42)
        wait_for(lambda: runs_of(records, "ship"), timeout=30, what="the relayed event")
    (relay,) = runs_of(records, "relay_to_shipping")
    (shipped,) = runs_of(records, "ship")
    assert shipped["kwargs"] == {"order_id": 42, "relayed_by": relay["pid"]}
