"""A worker killed right after taking a message from Redis: kombu's channel loses it, the worker's keeps it.

Differential: the same message, the same death (the consuming process exits the moment the
message reaches it, before any callback), once with kombu's Redis transport and once with the
transport ``celery -A worker worker`` uses (``runtime/redis_fetch.py``), against a real Redis.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Connection, Queue
from litestar.testing import TestClient

from litestar_celery_events.runtime.redis_fetch import RELIABLE_REDIS_TRANSPORT
from tests.apps.connections import SETTINGS_ENV
from tests.helpers import celery_worker, read_records, wait_for

pytestmark = pytest.mark.integration

# Consume one message with TRANSPORT, dying (os._exit) the moment the channel hands it over.
_DIE_ON_DELIVERY = """
import os, sys
from kombu import Connection, Queue
from litestar.testing import TestClient
from kombu.transport import virtual
virtual.Transport._deliver = lambda self, message, queue: os._exit(9)
url, transport, queue = sys.argv[1:]
with Connection(url, transport=transport or None) as connection:
    with connection.Consumer(Queue(queue), callbacks=[lambda body, message: None], accept=["json"]):
        connection.drain_events(timeout=10)
"""


def _publish_one(url: str, queue: str) -> None:
    with Connection(url) as connection:
        connection.Producer().publish({"n": 1}, routing_key=queue, declare=[Queue(queue)], serializer="json")


@pytest.mark.parametrize(
    ("transport", "kept"), [("", False), (RELIABLE_REDIS_TRANSPORT, True)], ids=["kombu", "worker"]
)
def test_a_message_taken_by_a_consumer_that_dies_at_once_is_kept_as_unacknowledged(
    redis_url: str, transport: str, kept: bool
) -> None:
    queue = f"fetch-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(redis_url)
    client.delete("unacked", "unacked_index")
    _publish_one(redis_url, queue)
    died = subprocess.run(
        [sys.executable, "-c", _DIE_ON_DELIVERY, redis_url, transport, queue], timeout=30, check=False
    )
    assert died.returncode == 9, "the consumer took the message and died"
    assert client.llen(queue) == 0
    assert client.hlen("unacked") == (1 if kept else 0)
    if not kept:
        return  # kombu's channel: the message is gone for good
    # As after visibility_timeout: kombu's own sweep puts it back in its queue, and it runs.
    with Connection(redis_url, transport=transport, transport_options={"visibility_timeout": 0}) as connection:
        connection.default_channel.qos.restore_visible(num=10)
        assert client.llen(queue) == 1
        got: list[object] = []
        with connection.Consumer(
            Queue(queue), callbacks=[lambda body, m: (got.append(body), m.ack())], accept=["json"]
        ):
            connection.drain_events(timeout=5)
    assert got == [{"n": 1}]
    assert client.hlen("unacked") == 0


def test_an_ack_refused_while_the_broker_takes_no_writes_is_paid_later_and_the_message_does_not_run_again(
    redis_url: str,
) -> None:
    """As in a Sentinel failover (``NOREPLICAS`` until the new master takes writes): the listener
    finished, its ack is refused; the message must not go back to its queue when the channel closes
    (kombu's channel did that, and it ran twice), and its ``unacked`` record goes once writes are back."""
    queue = f"fetch-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(redis_url)
    client.delete("unacked", "unacked_index")
    _publish_one(redis_url, queue)
    got: list[object] = []

    def refuse_writes_then_ack(body: object, message: Any) -> None:
        got.append(body)
        client.config_set("min-replicas-to-write", 1)  # no replica: every write is refused (NOREPLICAS)
        message.ack()

    try:
        with Connection(redis_url, transport=RELIABLE_REDIS_TRANSPORT) as connection:
            with connection.Consumer(Queue(queue), callbacks=[refuse_writes_then_ack], accept=["json"]):
                connection.drain_events(timeout=5)
            assert got == [{"n": 1}]
            assert client.hlen("unacked") == 1, "the ack was refused"
        assert client.llen(queue) == 0, "not put back in its queue when the channel closed"
    finally:
        client.config_set("min-replicas-to-write", 0)
    with Connection(redis_url, transport=RELIABLE_REDIS_TRANSPORT, transport_options={"visibility_timeout": 0}) as c:
        c.default_channel.qos.restore_visible(num=10)  # pays the owed ack first: nothing is left to restore
    assert client.hlen("unacked") == 0
    assert client.llen(queue) == 0


@pytest.mark.parametrize("flavour", ["redis", "sentinel"])
def test_the_worker_takes_messages_with_the_recording_channel(
    flavour: str, request: pytest.FixtureRequest, use_env: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    if flavour == "sentinel":
        group = request.getfixturevalue("sentinel_redis")
        client = redis.Redis(port=group.master_port)
        settings = {"broker_transport_options": {"master_name": group.master_name}}
        env = use_env(
            f"sentinel://127.0.0.1:{group.sentinel_port}",
            app="tests.apps.connections:create_app",
            **{SETTINGS_ENV: json.dumps(settings)},
        )
        emit = ("conn_ping", {"n": 1})
    else:
        redis_url = request.getfixturevalue("redis_url")
        client = redis.Redis.from_url(redis_url)
        env = use_env(redis_url)
        emit = ("user_created", {"email": "ada@example.com"})
    with celery_worker(env, tmp_path / "worker.log", queues=env["TEST_QUEUE"]) as worker:
        client.config_resetstat()
        app = importlib.import_module(env["LITESTAR_APP"].partition(":")[0]).create_app()
        with TestClient(app):
            app.emit(emit[0], **emit[1])
        wait_for(lambda: read_records(Path(env["RECORD_FILE"])), what="the listener")
        time.sleep(0.3)  # the idle wait after the message
        stats = client.info("commandstats")
    assert "redis_fetch:" in worker.output(), "the worker's banner names the transport"
    assert "cmdstat_eval" in stats, "messages are taken by the Lua script"
    assert "cmdstat_blmove" in stats, "the idle worker waits with BLMOVE"
    assert "cmdstat_brpop" not in stats
