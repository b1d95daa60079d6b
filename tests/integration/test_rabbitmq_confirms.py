"""RabbitMQ drops the publisher's connection mid-stream: with publisher confirms nothing is lost.

A 40,000-event stream from a real emitter to the machine's RabbitMQ while the broker (a) closes
the publisher's connection (``rabbitmqctl close_connection``, found by its ``connection_name``;
never anyone else's) and (b) restarts its application (``rabbitmqctl stop_app``/``start_app``).
Then every message in the test's own queue is read: each emission must be there (re-sent ones
may be there twice: duplicates are counted, not failures), and the publisher's counters add up.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kombu import Connection, Queue
from litestar.events import listener as litestar_listener

from litestar_celery_events import CeleryEventEmitter, CeleryEventsConfig
from tests.helpers import port_open, wait_for

pytestmark = pytest.mark.integration

EVENTS = 40_000
EMIT_CHUNK = 500
EMIT_CHUNK_EVERY_S = 0.1  # 5,000 events/s: the stream lasts about 8 s


@litestar_listener("stream_tick")
def stream_tick(n: int) -> None:
    """Never runs here: the test reads the queue itself."""


def _rabbitmqctl_argv() -> list[str] | None:
    """``rabbitmqctl`` on PATH, else inside the one RabbitMQ container (CI's service container)."""
    if shutil.which("rabbitmqctl"):
        return ["rabbitmqctl"]
    if not shutil.which("docker"):
        return None
    listing = subprocess.run(
        ["docker", "ps", "--format", "{{.ID}} {{.Image}}"], check=False, capture_output=True, text=True
    ).stdout
    ids = [ident for ident, _, image in (line.partition(" ") for line in listing.splitlines()) if "rabbitmq" in image]
    return ["docker", "exec", ids[0], "rabbitmqctl"] if len(ids) == 1 else None


def _rabbitmqctl(*args: str) -> str:
    argv = _rabbitmqctl_argv()
    assert argv is not None
    out = subprocess.run([*argv, *args], capture_output=True, text=True, timeout=60, check=True)
    return out.stdout


def _close_connections_named(name: str) -> int:
    """Close only the connections whose client-provided ``connection_name`` is ``name``."""
    listing = _rabbitmqctl("list_connections", "pid", "client_properties", "-q", "--no-table-headers")
    pids = [line.split("\t", 1)[0] for line in listing.splitlines() if f'{{"connection_name","{name}"}}' in line]
    for pid in pids:
        _rabbitmqctl("close_connection", pid, "test")
    return len(pids)


def _restart_broker_app() -> float:
    """``stop_app`` then ``start_app``: the broker is away for the returned number of seconds."""
    started = time.monotonic()
    try:
        _rabbitmqctl("stop_app")
    finally:
        _rabbitmqctl("start_app")
    wait_for(lambda: port_open(5672), timeout=30, what="RabbitMQ back")
    return time.monotonic() - started


@pytest.fixture
def stream_emitter(amqp_url: str, tmp_path: Any) -> Iterator[CeleryEventEmitter]:
    if _rabbitmqctl_argv() is None:  # the broker-side disruptions need it
        if os.environ.get("CI"):
            pytest.fail("no rabbitmqctl on PATH nor one RabbitMQ container: the disruption tests cannot disrupt")
        pytest.skip("rabbitmqctl is not installed on this machine")
    queue = f"confirms-{uuid.uuid4().hex[:10]}"
    config = CeleryEventsConfig(
        # The name this test finds the publisher's connection by (the default names the process).
        celery_config={"broker_transport_options": {"client_properties": {"connection_name": queue}}},
        broker_url=amqp_url,
        default_queue=queue,
        data_dir=tmp_path / "data",
        max_buffered_events=EVENTS + 1,
        flush_timeout_s=60,
    )
    emitter = CeleryEventEmitter.bound_to(config)([stream_tick])
    emitter.start()
    try:
        yield emitter
    finally:
        if emitter.running:
            emitter.stop()
        with Connection(amqp_url) as connection:
            connection.default_channel.queue_delete(queue)


def _stream(emitter: CeleryEventEmitter, disrupt_at: dict[int, Callable[[], Any]]) -> list[str]:
    """Emit ``EVENTS`` at 5,000/s; once the publisher has published ``k``, start ``disrupt_at[k]``
    (in a thread of its own: the stream goes on meanwhile)."""
    publisher = emitter.publisher
    emission_ids: list[str] = []

    def disrupt() -> None:
        for threshold, action in sorted(disrupt_at.items()):
            wait_for(lambda threshold=threshold: publisher.published >= threshold, timeout=60, what="publishing")
            action()

    disruptor = threading.Thread(target=disrupt, name="disrupt-rabbitmq")
    disruptor.start()
    for start in range(0, EVENTS, EMIT_CHUNK):
        chunk_started = time.monotonic()
        emission_ids += [emitter.enqueue("stream_tick", n=n) for n in range(start, start + EMIT_CHUNK)]
        time.sleep(max(0.0, EMIT_CHUNK_EVERY_S - (time.monotonic() - chunk_started)))
    disruptor.join(90)
    assert not disruptor.is_alive()
    return emission_ids


def _queued_emission_ids(amqp_url: str, queue_name: str, expected: int) -> Counter[str]:
    """Every message in ``queue_name`` (read and removed), counted by emission (task) id."""
    seen: Counter[str] = Counter()

    def collect(body: Any, message: Any) -> None:
        seen[message.headers["id"]] += 1

    with Connection(amqp_url) as connection:
        queue = Queue(queue_name, channel=connection.default_channel, no_declare=True)
        with connection.Consumer(queue, callbacks=[collect], no_ack=True, accept=["json"], prefetch_count=2000):
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    connection.drain_events(timeout=2 if sum(seen.values()) < expected else 0.5)
                except TimeoutError:
                    if sum(seen.values()) >= expected:
                        break  # and nothing more for 0.5 s: the queue is empty
    return seen


def _check_nothing_lost(emitter: CeleryEventEmitter, emission_ids: list[str], amqp_url: str) -> Counter[str]:
    publisher = emitter.publisher
    wait_for(lambda: publisher.waiting == 0, timeout=60, what="every event to be confirmed")
    assert emitter.stop() == 0
    counts = publisher.counts()
    assert counts.add_up, counts
    assert (counts.emitted, counts.published, counts.waiting, counts.dropped, counts.lost) == (EVENTS, EVENTS, 0, 0, 0)

    seen = _queued_emission_ids(amqp_url, emitter.config.default_queue or "", EVENTS)
    missing = set(emission_ids) - set(seen)
    duplicated = sum(n - 1 for n in seen.values())
    print(f"{len(seen)} of {EVENTS} distinct emissions in the queue, {len(missing)} missing, {duplicated} duplicated")
    assert not missing, f"{len(missing)} emitted events never reached the queue, e.g. {sorted(missing)[:5]}"
    assert set(seen) == set(emission_ids)
    return seen


def test_a_stream_survives_the_broker_closing_the_publishers_connection(
    stream_emitter: CeleryEventEmitter, amqp_url: str
) -> None:
    name = stream_emitter.config.default_queue or ""
    closed: list[int] = []

    def close() -> None:
        closed.append(_close_connections_named(name))

    emission_ids = _stream(stream_emitter, {EVENTS // 5: close, EVENTS // 2: close, EVENTS * 4 // 5: close})
    assert closed == [1, 1, 1], "each close found exactly the publisher's own connection"
    _check_nothing_lost(stream_emitter, emission_ids, amqp_url)


@pytest.mark.restarts_shared_rabbitmq
def test_a_stream_survives_a_rabbitmq_application_restart(stream_emitter: CeleryEventEmitter, amqp_url: str) -> None:
    """Disrupts every RabbitMQ client on this machine for a few seconds: run once per session."""
    outage: list[float] = []
    emission_ids = _stream(stream_emitter, {EVENTS // 3: lambda: outage.append(_restart_broker_app())})
    print(f"RabbitMQ stop_app/start_app took {outage[0]:.1f}s")
    _check_nothing_lost(stream_emitter, emission_ids, amqp_url)
