"""Differential: each routing configuration, one event through the library and one ``send_task``.

Per row: the library publishes one message (emit, emit_later, beat's tick or a listener's own
task), stock Celery's ``send_task`` one more through the same Celery app (its tasks registered,
as in a worker); both must land in the same broker list/queue with the same priority and routing.
Then a real ``celery -A worker worker`` that consumes only the queue(s) Celery chose runs the
listener for both.
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Connection
from litestar import Litestar

from litestar_celery_events import cancel_scheduled, emit_later
from litestar_celery_events.cli.replay import replay_emission
from litestar_celery_events.runtime.mover import Mover
from litestar_celery_events.runtime.tasks import register_event_tasks
from litestar_celery_events.stores.state import schedule_store_for, state_store_of
from tests.apps.routed import PRICED_EVENT, ROUTED_EVENT, create_app, queue
from tests.helpers import CeleryProcess, celery_worker, read_records, redis_server_binary, wait_for

pytestmark = pytest.mark.integration

NO_DISK = ("--save", "", "--appendonly", "no")
Placement = tuple[str, Any, str, str]
"""(queue or Redis list, priority property, exchange, routing key) of one message."""

LANDS_IN: dict[str, tuple[str, ...]] = {
    "task_routes-dict": ("routed",),
    "task_routes-str": ("routed",),
    "task_routes-list": ("routed",),
    "brought-celery_app": ("routed",),
    "emit_later-routed": ("routed",),
    "periodic-routed": ("routed",),
    "default_queue": ("default",),
    "task_default_queue": ("default",),
    "priority_steps": ("default",),
    "global_keyprefix": ("default",),
    "task_default_priority": ("default",),
    "listener-queue-priority": ("priced",),
    "topic-exchange-two-queues": ("a", "b"),
    "emit_later-topic": ("a", "b"),
}
"""Where Celery puts the message of each case (queue names before the per-test tag)."""

APP_CASE = {"emit_later-routed": "task_routes-dict", "emit_later-topic": "topic-exchange-two-queues"}
"""Cases that reuse another case's settings (``tests.apps.routed.CASES``)."""

REDIS_KEYS = {
    "priority_steps": "\x06\x169",
    "task_default_priority": "\x06\x163",
    "listener-queue-priority": "\x06\x166",
}
"""kombu's Redis priority lists: priority 0 with steps [1, 5, 9] -> 9; 5 -> 3; 7 -> 6 (default steps)."""

AMQP_SAME = ("priority_steps", "global_keyprefix", "emit_later-topic")
ROWS = [
    *(pytest.param("redis", case, id=f"redis-{case}") for case in LANDS_IN),
    pytest.param("unix_redis", "task_routes-dict", id="redis-unix-socket-task_routes-dict"),
    pytest.param("unix_redis", "task_default_priority", id="redis-unix-socket-task_default_priority"),
    # Redis transport options; emit_later-topic is emit_later-routed on RabbitMQ.
    *(pytest.param("amqp", case, id=f"amqp-{case}") for case in LANDS_IN if case not in AMQP_SAME),
]


@pytest.fixture(scope="session")
def unix_redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("unix-redis")
    socket_path = folder / "redis.sock"
    proc = subprocess.Popen(
        [redis_server_binary(), "--port", "0", "--unixsocket", str(socket_path), "--unixsocketperm", "700", *NO_DISK],
        cwd=folder,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(socket_path.exists, timeout=10, what="redis-server on a unix socket")
        yield f"redis+socket://{socket_path}"
    finally:
        proc.terminate()
        proc.wait(10)


def _marker(body: Any) -> str:
    _, kwargs, _ = body
    return str(kwargs["marker"])


class RedisView:
    """What sits in Redis lists whose names carry this test's tag."""

    def __init__(self, url: str, tag: str) -> None:
        if url.startswith("redis+socket://"):
            self.client = redis.Redis(unix_socket_path=url.removeprefix("redis+socket://"))
        else:
            self.client = redis.Redis.from_url(url)
        self.tag = tag

    def placements(self) -> dict[str, list[Placement]]:
        found: dict[str, list[Placement]] = {}
        for key in self.client.scan_iter(match=f"*{self.tag}*"):
            if self.client.type(key) != b"list":
                continue
            for raw in self.client.lrange(key, 0, -1):
                message = json.loads(raw)
                props = message["properties"]
                body = json.loads(base64.b64decode(message["body"]))
                info = props["delivery_info"]
                placement = (key.decode(), props["priority"], info["exchange"], info["routing_key"])
                found.setdefault(_marker(body), []).append(placement)
        return found

    def prepare(self, celery_app: Any, queues: list[str]) -> None:
        """Declare the queues (and their bindings) as a worker would before consuming."""
        with celery_app.connection_for_write() as connection:
            for name in queues:
                celery_app.amqp.queues[name].bind(connection.default_channel).declare()

    def close(self) -> None:
        self.client.close()


class AmqpView:
    """What sits in the RabbitMQ queues a case may use (read with basic_get, left in place)."""

    def __init__(self, url: str, queues: list[str]) -> None:
        self.url = url
        self.queues = queues
        self.exchanges: set[str] = set()

    def prepare(self, celery_app: Any, queues: list[str]) -> None:
        with celery_app.connection_for_write() as connection:
            for name in queues:
                celery_app.amqp.queues[name].bind(connection.default_channel).declare()
                self.exchanges.add(celery_app.amqp.queues[name].exchange.name)

    def placements(self) -> dict[str, list[Placement]]:
        found: dict[str, list[Placement]] = {}
        with Connection(self.url) as connection:
            channel = connection.channel()
            for name in self.queues:
                while (message := channel.basic_get(name, no_ack=False)) is not None:
                    info = message.delivery_info
                    priority = message.properties.get("priority", 0)
                    placement = (name, priority, info["exchange"], info["routing_key"])
                    found.setdefault(_marker(json.loads(message.body)), []).append(placement)
            channel.close()  # unacknowledged: back in their queues for the worker
        return found

    def close(self) -> None:
        """Delete this test's queues and the exchanges Celery declared for them."""
        with Connection(self.url) as connection:
            channel = connection.channel()
            for name in self.queues:
                channel.queue_delete(name)
            for name in self.exchanges:
                channel.exchange_delete(name)
            channel.close()


def _library_publishes(case: str, app: Litestar, env: dict[str, str], tmp_path: Path) -> None:
    """The library's side of a case: what a web process, beat or the CLI would publish."""
    emitter = app.event_emitter
    if case == "periodic-routed":
        beat = CeleryProcess(["beat", "--loglevel", "INFO"], env, tmp_path / "beat.log")
        try:
            beat.wait_output("beat: emitted", timeout=30)
        finally:
            beat.stop()
        return
    emitter.start()
    try:
        if case.startswith("emit_later"):  # on Redis, a route through a topic exchange: Celery's eta via kombu
            emit_later(app, ROUTED_EVENT, marker="library", delay=0.3)
        elif case == "listener-queue-priority":
            spec = emitter.registry.by_event[PRICED_EVENT][0]
            record = {"event_id": PRICED_EVENT, "listener": spec.name, "kwargs": {"marker": "library"}}
            emitter.submit(
                replay_emission({**record, "emission_id": str(uuid.uuid4())}, emitter.registry, emitter.config)
            )
        else:
            emitter.emit(ROUTED_EVENT, marker="library")
    finally:
        assert emitter.stop() == 0
    if case == "emit_later-routed" and str(env["CELERY_BROKER_URL"]).startswith("redis://"):
        time.sleep(0.4)  # due now: the mover (one per worker) moves it; here, one move by hand
        mover = Mover(schedule_store_for(state_store_of(emitter.config, emitter.celery_app), emitter.celery_app), 0.1)  # type: ignore[arg-type]
        assert mover.move_once()[0] == 1
        mover.stop()


def _celery_sends(case: str, app: Litestar) -> None:
    """Stock Celery's side: ``send_task`` on the same app, with the tasks registered as in a worker."""
    emitter = app.event_emitter
    celery_app = emitter.celery_app
    register_event_tasks(celery_app, emitter.registry, emitter.config)
    if case == "listener-queue-priority":
        spec = emitter.registry.by_event[PRICED_EVENT][0]
        name = emitter.config.listener_task_name(PRICED_EVENT, spec.name)
    else:
        name = emitter.config.event_task_name(ROUTED_EVENT)
    countdown = 0.3 if case.startswith("emit_later") else None
    celery_app.send_task(name, kwargs={"marker": "celery"}, countdown=countdown)


@pytest.mark.parametrize(("broker", "case"), ROWS)
def test_the_library_publishes_where_send_task_does_and_a_worker_on_that_queue_runs_it(
    broker: str,
    case: str,
    request: pytest.FixtureRequest,
    use_env: Callable[..., dict[str, str]],
    tmp_path: Path,
) -> None:
    url = str(request.getfixturevalue(f"{broker}_url"))
    tag = uuid.uuid4().hex[:10]
    env = use_env(url, app="tests.apps.routed:create_app", ROUTING_CASE=APP_CASE.get(case, case), ROUTE_TAG=tag)
    expected = [queue(name) for name in LANDS_IN[case]]
    app = create_app()
    celery_app = app.event_emitter.celery_app
    view: RedisView | AmqpView = AmqpView(url, expected) if broker == "amqp" else RedisView(url, tag)
    try:
        view.prepare(celery_app, expected)
        _library_publishes(case, app, env, tmp_path)
        _celery_sends(case, app)
        placements = wait_for(
            lambda: _both_landed(view.placements(), len(expected)), timeout=10, what="both messages in the broker"
        )
        if broker == "amqp" and case.startswith("emit_later"):
            # RabbitMQ: the library's delayed event waits in the delay levels (Celery's countdown in a
            # worker's memory), so it arrives through their last exchange: same queue, same priority.
            placements = {marker: [p[:2] for p in found] for marker, found in placements.items()}
        assert set(placements["library"]) == set(placements["celery"])
        where = sorted(placement[0] for placement in placements["celery"])
        if broker == "amqp":
            assert where == sorted(expected)
        else:
            prefix = f"app-{tag}:" if case == "global_keyprefix" else ""
            assert where == sorted(prefix + name + REDIS_KEYS.get(case, "") for name in expected)
        library_messages = len(placements["library"])  # beat may have fired a second tick

        with celery_worker(env, tmp_path / "worker.log", queues=",".join(expected)):
            records = Path(env["RECORD_FILE"])
            want = len(expected) + library_messages  # each message runs once per queue it landed in
            wait_for(lambda: len(read_records(records)) >= want, timeout=30, what="the listener runs")
        markers = sorted(r["kwargs"]["marker"] for r in read_records(records))
        assert markers == sorted(["celery"] * len(expected) + ["library"] * library_messages)
    finally:
        view.close()


def _both_landed(placements: dict[str, list[Any]], copies: int) -> dict[str, list[Any]] | None:
    if len(placements.get("library", [])) >= copies and len(placements.get("celery", [])) >= copies:
        return placements
    return None


def test_a_cancelled_emit_later_through_a_topic_exchange_on_redis_never_runs(
    redis_url: str, use_env: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    """Such a delayed event rides Celery's eta (as send_task's countdown): the worker checks the cancel."""
    tag = uuid.uuid4().hex[:10]
    env = use_env(
        redis_url, app="tests.apps.routed:create_app", ROUTING_CASE="topic-exchange-two-queues", ROUTE_TAG=tag
    )
    app = create_app()
    emitter = app.event_emitter
    queues = [queue("a"), queue("b")]
    view = RedisView(redis_url, tag)
    try:
        view.prepare(emitter.celery_app, queues)
        emitter.start()
        cancelled = emit_later(app, ROUTED_EVENT, marker="cancelled", delay=1.5)
        emit_later(app, ROUTED_EVENT, marker="kept", delay=1.5)
        assert cancel_scheduled(app, cancelled) is True
        assert emitter.stop() == 0
        records = Path(env["RECORD_FILE"])
        with celery_worker(env, tmp_path / "worker.log", queues=",".join(queues)) as worker:
            wait_for(lambda: len(read_records(records)) >= 2, timeout=30, what="the kept event's runs")
            worker.wait_output("cancelled before it was due", timeout=10)
        assert sorted(r["kwargs"]["marker"] for r in read_records(records)) == ["kept", "kept"]
    finally:
        view.close()
