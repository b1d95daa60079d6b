"""The asyncio pool (``async_concurrency``) with a real ``celery -A worker worker`` and no pool flag:
listeners really overlap, and acks_late, retries, time limits, the log context, sync listeners and
the failed-events store behave as under prefork.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from litestar import Litestar
from litestar.testing import TestClient

from litestar_celery_events import CeleryEventEmitter
from litestar_celery_events.stores.failed import FailedStore
from litestar_celery_events.stores.state import failed_store_for
from tests.apps.concurrent import CONCURRENCY, create_app
from tests.helpers import CeleryProcess, runs_of, wait_for

pytestmark = pytest.mark.integration

APP = "tests.apps.concurrent:create_app"


@pytest.fixture
def env(broker_url: str, use_env: Callable[..., dict[str, str]]) -> dict[str, str]:
    """Both brokers: on RabbitMQ a dead worker's messages come back when its connection drops, on
    Redis after ``visibility_timeout`` (3 s here)."""
    return use_env(broker_url, APP, CELERY_EVENTS_LOG_FORMAT="json", VISIBILITY_TIMEOUT_S="3")


@pytest.fixture
def app(env: dict[str, str]) -> Litestar:
    return create_app()


@pytest.fixture
def store(app: Litestar) -> Iterator[FailedStore]:
    made = failed_store_for(_emitter(app).config, _emitter(app).celery_app)
    made.purge()
    yield made
    made.close()


@contextmanager
def async_worker(env: dict[str, str], log: Path) -> Iterator[CeleryProcess]:
    """``celery -A worker worker`` with no ``-P``/``-c``: the app's config chooses the pool."""
    args = ["worker", "--loglevel", "INFO", "--without-gossip", "--without-mingle", "--queues", env["TEST_QUEUE"]]
    worker = CeleryProcess([*args, "--hostname", f"test-{uuid.uuid4().hex[:8]}@%h"], env, log)
    try:
        worker.wait_ready()
        yield worker
    finally:
        worker.stop()


@pytest.fixture
def worker(env: dict[str, str], tmp_path: Path) -> Iterator[CeleryProcess]:
    with async_worker(env, tmp_path / "worker.log") as process:
        yield process


def _emitter(app: Litestar) -> CeleryEventEmitter:
    emitter = app.event_emitter
    assert isinstance(emitter, CeleryEventEmitter)
    return emitter


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    """Most intervals running at one instant."""
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = most = 0
    for _, step in edges:
        running += step
        most = max(most, running)
    return most


def _json_lines(worker: CeleryProcess) -> list[dict[str, Any]]:
    lines = []
    for line in worker.output().splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


def test_the_worker_runs_the_asyncio_pool_from_the_config_alone(worker: CeleryProcess) -> None:
    banner = worker.output()
    assert f"concurrency: {CONCURRENCY}" in banner
    assert "aio_pool" in banner, "the pool named by worker_pool in the app's config"


def test_fifty_one_second_listeners_run_at_the_same_time_each_in_its_own_log_context(
    app: Litestar, worker: CeleryProcess, env: dict[str, str]
) -> None:
    records = Path(env["RECORD_FILE"])
    with TestClient(app):
        emission_ids = {n: _emitter(app).enqueue("nap", n=n, seconds=1.0) for n in range(50)}

    runs = wait_for(lambda: len(runs_of(records, "nap")) == 50 and runs_of(records, "nap"), 60, "50 naps")
    assert sorted(r["kwargs"]["n"] for r in runs) == list(range(50))
    assert {r["pid"] for r in runs} == {worker.proc.pid}, "all in the worker's one process"
    assert _max_overlap([(r["kwargs"]["started"], r["kwargs"]["ended"]) for r in runs]) >= 40

    ends = {int(line["message"].split()[1]): line for line in _json_lines(worker) if line["message"].endswith(" ends")}
    assert sorted(ends) == list(range(50))
    for n, line in ends.items():  # after 1 s of 49 other coroutines interleaving: still its own context
        assert line["emission_id"] == emission_ids[n]
        assert line["event_id"] == "nap"
        assert line["listener"] == "tests.apps.concurrent.nap"


def test_a_failing_listener_is_retried_alone_and_its_sibling_runs_once(
    app: Litestar, worker: CeleryProcess, env: dict[str, str], store: FailedStore
) -> None:
    records = Path(env["RECORD_FILE"])
    with TestClient(app):
        for n in range(5):
            app.emit("flaky", n=n)

    wait_for(lambda: len(runs_of(records, "flaky")) == 5, 30, "the retried listeners to succeed")
    assert sorted(r["kwargs"]["n"] for r in runs_of(records, "flaky:attempt")) == sorted([*range(5), *range(5)])
    assert sorted(r["kwargs"]["n"] for r in runs_of(records, "flaky_sibling")) == list(range(5))
    assert store.count() == 0


def test_a_listener_that_fails_for_good_is_recorded_in_the_failed_store(
    app: Litestar, worker: CeleryProcess, store: FailedStore
) -> None:
    with TestClient(app):
        emission_id = _emitter(app).enqueue("doomed", n=7)

    [record] = wait_for(lambda: store.records(event_id="doomed"), 30, "the failed-event record")
    assert record["emission_id"] == emission_id
    assert record["exc_type"] == "builtins.RuntimeError"
    assert record["message"] == "card declined for order 7"
    assert record["attempts"] == 1


def test_the_soft_time_limit_cancels_the_listener_which_may_catch_it(
    app: Litestar, worker: CeleryProcess, env: dict[str, str], store: FailedStore
) -> None:
    records = Path(env["RECORD_FILE"])
    with TestClient(app):
        app.emit("polite_timeout")
        app.emit("rude_timeout")

    wait_for(lambda: runs_of(records, "polite_timeout:cleaned_up"), 30, "the caught cancellation to finish")
    [record] = wait_for(lambda: store.records(event_id="rude_timeout"), 30, "the escaped cancellation's record")
    assert record["exc_type"] == "billiard.exceptions.SoftTimeLimitExceeded"  # what prefork records too
    assert not store.records(event_id="polite_timeout"), "a listener that handles the cancellation succeeds"
    assert "Soft time limit (0.5s) exceeded" in worker.output()


def test_the_hard_time_limit_fails_a_listener_that_ignores_cancellation(
    app: Litestar, worker: CeleryProcess, env: dict[str, str], store: FailedStore
) -> None:
    with TestClient(app):
        app.emit("stuck")
        [record] = wait_for(lambda: store.records(event_id="stuck"), 30, "the hard limit's record")
        assert record["exc_type"] == "billiard.exceptions.TimeLimitExceeded"
        assert record["permanent"] is False
        app.emit("nap", n=1, seconds=0.1)  # the worker goes on

    wait_for(lambda: runs_of(Path(env["RECORD_FILE"]), "nap"), 30, "the next event")
    assert "Hard time limit (1s) exceeded" in worker.output()


def test_sync_listeners_run_on_threads_beside_the_loop_and_overlap(
    app: Litestar, worker: CeleryProcess, env: dict[str, str]
) -> None:
    records = Path(env["RECORD_FILE"])
    with TestClient(app):
        for n in range(8):
            app.emit("blocking", n=n)

    runs = wait_for(lambda: len(runs_of(records, "blocking")) == 8 and runs_of(records, "blocking"), 30, "8 runs")
    assert all(r["kwargs"]["thread"].startswith("celery-events-sync") for r in runs)
    assert not any(r["kwargs"]["on_loop"] for r in runs)
    assert _max_overlap([(r["kwargs"]["started"], r["kwargs"]["ended"]) for r in runs]) >= 4


def test_a_killed_worker_leaves_its_in_flight_events_to_be_redelivered(
    app: Litestar, env: dict[str, str], tmp_path: Path
) -> None:
    records = Path(env["RECORD_FILE"])
    with async_worker(env, tmp_path / "first.log") as first:
        with TestClient(app):
            app.emit("slow", seconds=3)
        wait_for(lambda: runs_of(records, "slow:start"), 30, "the listener to start")
        os.kill(first.proc.pid, signal.SIGKILL)  # the whole worker: the listener ran in its process
        first.proc.wait(10)
    assert not runs_of(records, "slow:done")
    # Past the visibility timeout before the next worker starts: kombu before unacked_restore_throttle
    # (5.4, the lowest supported) scans for such messages at start, then only about every 100 s.
    time.sleep(3.5)

    with async_worker(env, tmp_path / "second.log"):
        wait_for(lambda: runs_of(records, "slow:done"), 60, "the redelivered event to complete")
    assert len(runs_of(records, "slow:start")) == 2
    assert len(runs_of(records, "slow:done")) == 1


@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
def test_a_burst_runs_each_event_once_and_leaves_nothing_unacknowledged(
    app: Litestar, worker: CeleryProcess, env: dict[str, str], redis_url: str
) -> None:
    """Reservations are pipelined and acks batched on Redis: every record must still be removed."""
    records = Path(env["RECORD_FILE"])
    with TestClient(app):
        for n in range(500):
            app.emit("nap", n=n, seconds=0.0)

    wait_for(lambda: len(runs_of(records, "nap")) >= 500, 60, "500 runs")
    assert sorted(r["kwargs"]["n"] for r in runs_of(records, "nap")) == list(range(500))
    client = redis.Redis.from_url(redis_url)
    wait_for(lambda: client.hlen("unacked") == 0 and client.zcard("unacked_index") == 0, 10, "every ack")
    assert client.llen(env["TEST_QUEUE"]) == 0


def test_a_warm_shutdown_lets_the_listeners_in_flight_finish_and_acknowledges_them(
    app: Litestar, env: dict[str, str], tmp_path: Path
) -> None:
    records = Path(env["RECORD_FILE"])
    with async_worker(env, tmp_path / "first.log") as first:
        with TestClient(app):
            for _ in range(20):
                app.emit("slow", seconds=2)
        wait_for(lambda: len(runs_of(records, "slow:start")) == 20, 30, "20 listeners to start")
        os.killpg(first.proc.pid, signal.SIGTERM)  # warm shutdown: stop taking messages, finish the rest
        first.proc.wait(30)
        assert first.proc.returncode == 0, first.output()[-3000:]
    assert len(runs_of(records, "slow:done")) == 20

    time.sleep(3.5)  # on Redis, anything left unacknowledged is now past its visibility timeout
    with async_worker(env, tmp_path / "second.log"):  # which a starting worker restores: nothing must come back
        time.sleep(3)
    assert len(runs_of(records, "slow:start")) == 20
