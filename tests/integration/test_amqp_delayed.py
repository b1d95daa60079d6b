"""Delayed events on RabbitMQ: they wait in the broker's delay levels, never in a worker.

Real RabbitMQ (127.0.0.1:5672) and real ``celery -A worker worker`` processes. Each test session
uses delay levels of its own (a unique prefix) and deletes them at the end; in production the
levels of one prefix are shared by every app on the vhost, by design (see ``transports.amqp_delay``).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from kombu import Connection
from litestar import Litestar
from litestar.testing import TestClient

from harness.rabbitmq import PrivateRabbitMQ, rabbitmq_binary
from litestar_celery_events import CeleryEventEmitter, cancel_scheduled, emit_later
from litestar_celery_events.scheduling import scheduling_status
from litestar_celery_events.transports.amqp_delay import DelayLevels, level_name
from tests.apps.delayed import ETA_QUEUE_SUFFIX, create_app, queues_from_env
from tests.conftest import SESSION_TAG
from tests.helpers import (
    CeleryProcess,
    amqp_queue_exists,
    celery_worker,
    delete_delay_levels,
    runs_of,
    wait_for,
)

pytestmark = pytest.mark.integration

LATE_S = 2.0
"""How late (after the whole-second rounding) a delayed event may start here; the bench measures it."""
TWO_HOURS_S = 7200  # 4096 + 2048 + 1024 + 32: it waits in level 12 first
CELERY_LEVELS = [f"celery_delayed_{level}" for level in range(28)] + ["celery_delayed_delivery"]
"""Celery's own levels: its worker declares them on "/" when it sees a quorum queue."""


class CeleryLevels(DelayLevels):
    """Celery's own levels' names (kombu without a prefix), to delete them."""

    def __init__(self) -> None:
        super().__init__("celery", "quorum")
        self.delivery_exchange = CELERY_LEVELS[-1]

    def names(self) -> list[str]:
        return CELERY_LEVELS


@pytest.fixture(scope="session")
def level_prefixes(amqp_url: str) -> Iterator[dict[str, str]]:
    """A prefix per delay queue type for this session; its levels are deleted at the end."""
    prefixes = {kind: f"test-{SESSION_TAG}-{kind}" for kind in ("classic", "quorum")}
    celery_levels_before = amqp_queue_exists(amqp_url, CELERY_LEVELS[27])
    yield prefixes
    for kind, prefix in prefixes.items():
        delete_delay_levels(amqp_url, DelayLevels(prefix, kind))
    if not celery_levels_before and amqp_queue_exists(amqp_url, CELERY_LEVELS[27]):
        # Celery's own levels, declared by Celery's worker for the quorum queue test: same layout, no prefix.
        delete_delay_levels(amqp_url, CeleryLevels(), if_empty=True)


@pytest.fixture
def delayed_env(
    amqp_url: str, use_env: Callable[..., dict[str, str]], level_prefixes: dict[str, str]
) -> Iterator[Callable[..., dict[str, str]]]:
    queues: list[str] = []

    def make(queue_type: str = "classic", level_type: str = "quorum") -> dict[str, str]:
        env = use_env(
            amqp_url,
            app="tests.apps.delayed:create_app",
            TEST_QUEUE_TYPE=queue_type,
            DELAY_PREFIX=level_prefixes[level_type],
            DELAY_QUEUE_TYPE=level_type,
        )
        queues.append(env["TEST_QUEUE"])
        return env

    yield make
    with Connection(amqp_url) as connection:
        channel = connection.channel()
        for queue in queues:
            channel.queue_delete(queue)
            channel.exchange_delete(queue)


def _level_depths(amqp_url: str, prefix: str) -> dict[int, int]:
    with Connection(amqp_url) as connection:
        channel = connection.channel()
        depths = {
            level: int(channel.queue_declare(queue=level_name(level, prefix), passive=True).message_count)
            for level in range(28)
        }
    return {level: depth for level, depth in depths.items() if depth}


@pytest.mark.parametrize(
    ("queue_type", "level_type"),
    [("classic", "quorum"), ("quorum", "classic")],
    ids=["classic-queue-quorum-levels", "quorum-queue-classic-levels"],
)
def test_delayed_events_start_at_or_after_their_due_time_and_a_cancel_holds(
    queue_type: str, level_type: str, delayed_env: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    env = delayed_env(queue_type, level_type)
    records = Path(env["RECORD_FILE"])
    app = create_app()
    with celery_worker(env, tmp_path / "worker.log", queues=env["TEST_QUEUE"]) as worker, TestClient(app):
        now = time.time()
        due = {"delay": now + 2, "sub-second": now + 0.4, "at": now + 3.5, "timedelta": now + 3}
        emit_later(app, "reminder_due", note="delay", delay=2)
        emit_later(app, "reminder_due", note="sub-second", delay=0.4)
        emit_later(app, "reminder_due", note="at", at=datetime.fromtimestamp(due["at"], tz=timezone.utc))
        emit_later(app, "reminder_due", note="timedelta", delay=timedelta(seconds=3))
        dropped = emit_later(app, "reminder_due", note="cancelled", delay=2)
        assert cancel_scheduled(app, dropped) is True
        wait_for(lambda: len(runs_of(records, "reminder_listener")) >= 4, timeout=15, what="the delayed events")
        # A live worker got Celery's revoke too; the next test shows the tombstone alone.
        stopped = ("Discarding revoked task", "was cancelled before it was due")
        wait_for(lambda: any(m in worker.output() for m in stopped), timeout=10, what="the cancelled event")
        time.sleep(0.5)
        log = worker.output()

    runs = {r["kwargs"]["note"]: r["kwargs"] for r in runs_of(records, "reminder_listener")}
    assert sorted(runs) == sorted(due)  # the cancelled one never ran
    for note, due_at in due.items():
        started = runs[note]["at"]
        # Whole seconds, rounded up: never early, at most a second plus transit late.
        assert due_at <= started <= due_at + 1 + LATE_S, f"{note}: started {started - due_at:+.3f}s after due"
        assert runs[note]["eta"] is None  # an ordinary message: no worker held it as an ETA task
        assert runs[note]["dead_letter_headers"] == []  # RabbitMQ's x-death headers were dropped on arrival
    assert "ETA:" not in log
    assert "delayed events wait in RabbitMQ's delay levels" in log


def test_a_cancel_holds_for_a_worker_started_after_it_which_no_revoke_reached(
    delayed_env: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    env = delayed_env("classic", "quorum")
    records = Path(env["RECORD_FILE"])
    app = create_app()
    with TestClient(app):
        due = time.time() + 3
        dropped = emit_later(app, "reminder_due", note="cancelled", delay=3)
        emit_later(app, "reminder_due", note="kept", delay=3)
        assert cancel_scheduled(app, dropped) is True
        with celery_worker(env, tmp_path / "worker.log", queues=env["TEST_QUEUE"]) as worker:
            wait_for(lambda: "was cancelled before it was due" in worker.output(), timeout=15, what="the tombstone")
            wait_for(lambda: runs_of(records, "reminder_listener"), timeout=10, what="the kept event")
            time.sleep(0.5)
        assert cancel_scheduled(app, dropped) is True  # still cancelled, never dispatched
    runs = runs_of(records, "reminder_listener")
    assert [r["kwargs"]["note"] for r in runs] == ["kept"]
    assert runs[0]["kwargs"]["at"] >= due


def test_a_two_hour_delay_waits_in_the_delay_levels_not_in_the_worker(
    delayed_env: Callable[..., dict[str, str]], amqp_url: str, level_prefixes: dict[str, str], tmp_path: Path
) -> None:
    """A consumer_timeout only counts messages delivered and unacknowledged: this one is neither.

    Side by side, the same worker holds a plain Celery ``countdown=7200`` task in its memory (the
    message a lowered consumer_timeout would cancel the worker's channel over).
    """
    env = delayed_env("classic", "quorum")
    queue, prefix = env["TEST_QUEUE"], level_prefixes["quorum"]
    records = Path(env["RECORD_FILE"])
    app = create_app()
    plain = Celery(set_as_current=False, broker=amqp_url)
    plain.conf.update(task_serializer="json", accept_content=["json"])
    with celery_worker(env, tmp_path / "worker.log", queues=queue), TestClient(app):
        before = _level_depths(amqp_url, prefix)
        long_wait = emit_later(app, "reminder_due", note="two hours", delay=TWO_HOURS_S)
        wait_for(lambda: _level_depths(amqp_url, prefix) != before, timeout=10, what="the message in level 12")
        eta_task = plain.send_task("events.reminder_due", kwargs={"note": "eta"}, countdown=TWO_HOURS_S, queue=queue)
        emit_later(app, "reminder_due", note="short", delay=3)
        wait_for(lambda: runs_of(records, "reminder_listener"), timeout=15, what="the short delay")

        inspect = plain.control.inspect(timeout=3)
        held = [
            request["request"]["id"] if "request" in request else request["id"]
            for per_worker in (inspect.scheduled() or {}).values()
            for request in per_worker
        ]
        reserved = [r["id"] for per_worker in (inspect.reserved() or {}).values() for r in per_worker]
        depths = _level_depths(amqp_url, prefix)
        emitter = app.event_emitter
        assert isinstance(emitter, CeleryEventEmitter)
        status = scheduling_status(emitter, timeout_s=5)
        with Connection(amqp_url) as connection:
            waiting_in_queue = connection.channel().queue_declare(queue=queue, passive=True).message_count
        assert cancel_scheduled(app, long_wait) is True
        plain.control.revoke(eta_task.id)
    plain.close()

    assert depths.get(12, 0) - before.get(12, 0) == 1, depths  # 7200 s = 2**12 + 2**11 + 2**10 + 2**5
    assert waiting_in_queue == 0
    assert status["delayed_events_waiting"] == sum(depths.values())  # what `events status` prints
    assert status["delayed_events_wait_in"] == f"rabbitmq delay queues ({prefix}_celery_delayed_0..27)"
    assert long_wait not in held + reserved  # no worker holds it: nothing for consumer_timeout to count
    assert eta_task.id in held, f"the ETA baseline should be held by the worker: {held}"
    assert [r["kwargs"]["note"] for r in runs_of(records, "reminder_listener")] == ["short"]
    _purge_level(amqp_url, prefix, 12)


CONSUMER_TIMEOUT_S = 10
"""The lowered ``consumer_timeout`` of the private node (RabbitMQ's default is 30 minutes)."""


@dataclass
class TimeoutBroker:
    """A RabbitMQ whose consumer timeout is 10 s for the test's queues."""

    url: str
    node: PrivateRabbitMQ | None = None
    """A node of the test's own (its ``rabbitmqctl`` answers), or None: the shared one, per queue."""
    queue_arguments: dict[str, Any] = field(default_factory=dict)
    check_every_s: float = 1.0
    """How often the broker looks at the timeout (``channel_tick_interval``)."""


@pytest.fixture
def short_consumer_timeout_rabbitmq(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[TimeoutBroker]:
    """A RabbitMQ node of this test's own with ``consumer_timeout`` at 10 s, checked every second.

    The shared node's setting is broker-wide, and RabbitMQ 3.10 (this machine's) has no per-queue
    timeout. ``channel_tick_interval`` (default 60 s) is how often a channel checks the timeout:
    lowered so the expiry shows at 10-11 s instead of 10-70 s. Where RabbitMQ is not installed
    here but the shared one is 3.12 or later (CI's service container), the test's own queues get
    ``x-consumer-timeout`` there instead (the check then comes within 60 s after the timeout).
    """
    if rabbitmq_binary("rabbitmq-server") is None:
        amqp_url = str(request.getfixturevalue("amqp_url"))
        with Connection(amqp_url) as connection:
            connection.connect()
            version = str(connection.connection.server_properties.get("version", "0"))
        if tuple(int(p) for p in version.split(".")[:2] if p.isdigit()) < (3, 12):
            pytest.fail(f"rabbitmq-server is not installed here and RabbitMQ {version} has no per-queue timeout")
        yield TimeoutBroker(amqp_url, None, {"x-consumer-timeout": CONSUMER_TIMEOUT_S * 1000}, 60.0)
        return
    folder = tmp_path / "rabbitmq"
    folder.mkdir()
    node = PrivateRabbitMQ(
        folder,
        settings={"consumer_timeout": str(CONSUMER_TIMEOUT_S * 1000)},
        rabbit_env={"channel_tick_interval": 1000},
    )
    try:
        yield TimeoutBroker(node.url, node)
    finally:
        node.stop()


_CHANNEL_TIMED_OUT = "delivery acknowledgement on channel"


@pytest.mark.rabbitmq
@pytest.mark.timeout(240)
def test_a_two_hour_delay_survives_a_consumer_timeout_lowered_to_10_s_where_celerys_eta_loses_its_channel(
    short_consumer_timeout_rabbitmq: TimeoutBroker, use_env: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    """Two workers on a node with ``consumer_timeout = 10000``: one gets a 2-hour ``emit_later`` (the delay
    levels hold it), the other a stock Celery ``countdown=7200`` task (the worker holds it, unacked).
    After the timeout only the ETA worker's channel is closed by the broker, and a short delay
    emitted after it still runs on the first worker."""
    broker = short_consumer_timeout_rabbitmq
    prefix = f"test-{SESSION_TAG}-timeout"
    env = use_env(
        broker.url,
        app="tests.apps.delayed:create_app",
        DELAY_PREFIX=prefix,
        DELAY_QUEUE_TYPE="quorum",
        QUEUE_ARGUMENTS=json.dumps(broker.queue_arguments),
    )
    levels_queue, eta_queue = env["TEST_QUEUE"], env["TEST_QUEUE"] + ETA_QUEUE_SUFFIX
    app = create_app()
    plain = Celery(set_as_current=False, broker=broker.url)
    plain.conf.update(task_serializer="json", accept_content=["json"], task_queues=queues_from_env())
    try:
        _race_the_timeout(broker, env, prefix, app, plain, (levels_queue, eta_queue), tmp_path)
    finally:
        plain.close()
        if broker.node is None:  # the shared node: the test's queues and levels go
            delete_delay_levels(broker.url, DelayLevels(prefix, "quorum"))
            with Connection(broker.url) as connection:
                for queue in (levels_queue, eta_queue):
                    connection.channel().queue_delete(queue)
                    connection.channel().exchange_delete(queue)


def _race_the_timeout(
    broker: TimeoutBroker,
    env: dict[str, str],
    prefix: str,
    app: Litestar,
    plain: Celery,
    queues: tuple[str, str],
    tmp_path: Path,
) -> None:
    levels_queue, eta_queue = queues
    records = Path(env["RECORD_FILE"])
    with (
        celery_worker(env, tmp_path / "levels-worker.log", queues=levels_queue) as levels_worker,
        celery_worker(env, tmp_path / "eta-worker.log", queues=eta_queue) as eta_worker,
        TestClient(app),
    ):
        emit_later(app, "reminder_due", note="two hours", delay=TWO_HOURS_S)
        wait_for(lambda: _level_depths(broker.url, prefix).get(12), timeout=10, what="the message in level 12")
        plain.send_task("events.reminder_due", kwargs={"note": "eta"}, countdown=TWO_HOURS_S, queue=eta_queue)
        wait_for(lambda: "Task events.reminder_due" in eta_worker.output(), timeout=15, what="the ETA task held")
        held_at = time.monotonic()
        unacked_while_held = {queue: _unacked(broker.node).get(queue) for queue in (levels_queue, eta_queue)}

        def eta_channel_closed() -> bool:
            return _CHANNEL_TIMED_OUT in eta_worker.output()

        wait_for(
            eta_channel_closed,
            timeout=CONSUMER_TIMEOUT_S + broker.check_every_s + 30,
            what="the broker to close the ETA worker's channel",
        )
        closed_after_s = time.monotonic() - held_at
        due = time.time() + 3
        emit_later(app, "reminder_due", note="short", delay=3)
        wait_for(lambda: runs_of(records, "reminder_listener"), timeout=15, what="the short delay after the timeout")
        depths = _level_depths(broker.url, prefix)
        levels_log, eta_log = levels_worker.output(), eta_worker.output()

    stopped = "Unrecoverable error" in eta_log  # Celery 5.7 here: the worker exits on the closed channel
    print(f"ETA worker's channel closed {closed_after_s:.1f} s after it took the task (worker stopped: {stopped}); "
          f"unacked before: {unacked_while_held}")  # fmt: skip
    if broker.node is not None:  # rabbitmqctl answers: the broker's own count
        assert unacked_while_held == {levels_queue: 0, eta_queue: 1}, "the worker holds the ETA task, not the event"
    assert closed_after_s >= CONSUMER_TIMEOUT_S - 1
    assert _CHANNEL_TIMED_OUT not in levels_log, "the delay-level worker's channel was never closed"
    assert "Connection to broker lost" not in levels_log
    assert depths.get(12) == 1, f"the 2-hour event still waits in level 12: {depths}"
    [short] = runs_of(records, "reminder_listener")
    assert short["kwargs"]["note"] == "short"
    assert due <= short["kwargs"]["at"] <= due + 1 + LATE_S


def _unacked(node: PrivateRabbitMQ | None) -> dict[str, int]:
    """Messages delivered and not yet acknowledged, per queue that has consumers (what ``consumer_timeout`` counts)."""
    if node is None:
        return {}
    listing = node.ctl("list_queues", "--no-table-headers", "name", "messages_unacknowledged", "consumers")
    rows = [line.split("\t") for line in listing.splitlines()]
    return {name: int(unacked) for name, unacked, consumers in (r for r in rows if len(r) == 3) if int(consumers)}


def _purge_level(amqp_url: str, prefix: str, level: int) -> None:
    with Connection(amqp_url) as connection:
        connection.channel().queue_purge(level_name(level, prefix))


def test_a_listener_retried_after_a_delayed_event_runs_once_more_and_stops(
    delayed_env: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    env = delayed_env("classic", "quorum")
    records = Path(env["RECORD_FILE"])
    app = create_app()
    with celery_worker(env, tmp_path / "worker.log", queues=env["TEST_QUEUE"]), TestClient(app):
        due = time.time() + 1
        emit_later(app, "payment_due", n=7, delay=1)
        wait_for(lambda: runs_of(records, "flaky_payment"), timeout=15, what="the retried listener to succeed")
        time.sleep(3)  # a retry that looped would run again by now
    attempts = runs_of(records, "flaky_payment:attempt")
    assert len(attempts) == 2, attempts
    assert len(runs_of(records, "flaky_payment")) == 1
    assert due <= attempts[0]["kwargs"]["at"]


def test_delay_levels_of_another_type_stop_the_worker_with_the_setting_to_change(
    amqp_url: str, use_env: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    prefix = f"test-{SESSION_TAG}-{uuid.uuid4().hex[:6]}"
    classic = DelayLevels(prefix, "classic")
    with Connection(amqp_url) as connection:
        classic.declare(connection.default_channel)
    env = use_env(amqp_url, app="tests.apps.delayed:create_app", DELAY_PREFIX=prefix, DELAY_QUEUE_TYPE="quorum")
    try:
        worker = CeleryProcess(
            ["worker", "--loglevel", "INFO", "--concurrency", "1", "--queues", env["TEST_QUEUE"]],
            env,
            tmp_path / "worker.log",
        )
        try:
            wait_for(lambda: worker.proc.poll() is not None, timeout=60, what="the worker to stop")
        finally:
            worker.stop()
        log = worker.output()
        assert "DelayTopologyError" in log
        assert "broker_native_delayed_delivery_queue_type" in log
    finally:
        delete_delay_levels(amqp_url, classic)
        with Connection(amqp_url) as connection:
            connection.channel().queue_delete(env["TEST_QUEUE"])
            connection.channel().exchange_delete(env["TEST_QUEUE"])
