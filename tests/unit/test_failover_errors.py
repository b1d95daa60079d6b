"""A Redis that takes no writes now (failing over) is a lost connection to every client, not a refusal."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
import redis
from redis.sentinel import SentinelManagedConnection, SentinelManagedSSLConnection

from litestar_celery_events import CeleryEventsConfig
from litestar_celery_events.batches import REFUSED_AFTER_ATTEMPTS, BatchSizer
from litestar_celery_events.brokers import redis_settings_for_url
from litestar_celery_events.brokers.failover import (
    FailoverAwareConnection,
    FailoverAwareSentinelConnection,
    FailoverAwareSentinelSSLConnection,
    FailoverAwareSSLConnection,
    MasterUnavailableError,
    failover_aware,
    failover_hazard,
    unwritable,
)
from litestar_celery_events.runtime.redis_fetch import Channel, SentinelChannel
from tests.helpers import free_port, port_open, redis_server_binary, wait_for

NOREPLICAS = "NOREPLICAS Not enough good replicas to write."


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (redis.ResponseError(NOREPLICAS), True),
        (redis.ResponseError(f"{NOREPLICAS} script: fe9d2678, on @user_script:4."), True),
        (redis.ResponseError(f"Command # 1 (EVALSHA 7de1 3 a b c) of pipeline caused error: {NOREPLICAS}"), True),
        (redis.ResponseError("MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'."), True),
        (redis.ReadOnlyError("You can't write against a read only replica."), True),
        (redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"), False),
        (redis.ResponseError("ERR max number of clients reached"), False),
        (redis.ResponseError("NOREPLICASX is not the code"), False),
        (redis.ConnectionError("Connection refused"), False),
    ],
    ids=["noreplicas", "in-a-script", "in-a-pipeline", "masterdown", "readonly", "wrongtype", "err", "prefix", "conn"],
)
def test_replies_of_a_server_that_takes_no_writes_now_are_recognised(exc: Exception, expected: bool) -> None:
    assert unwritable(exc) is expected


def test_every_redis_py_connection_class_has_a_failover_aware_version_and_the_worker_uses_them() -> None:
    assert failover_aware(redis.Connection) is FailoverAwareConnection
    assert failover_aware(SentinelManagedConnection) is FailoverAwareSentinelConnection
    assert failover_aware(SentinelManagedSSLConnection) is FailoverAwareSentinelSSLConnection
    assert issubclass(FailoverAwareSentinelConnection, SentinelManagedConnection)
    assert issubclass(MasterUnavailableError, redis.ConnectionError), "kombu and Celery reconnect on it"
    assert (Channel.connection_class, Channel.connection_class_ssl) == (
        FailoverAwareConnection,
        FailoverAwareSSLConnection,
    )
    assert SentinelChannel.connection_class is FailoverAwareSentinelConnection


@pytest.fixture
def replicaless_master(tmp_path: Path) -> Iterator[int]:
    """A master that must have one replica to take writes, and has none: what a failover leaves for a while."""
    port = free_port()
    argv = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen([*argv, "--min-replicas-to-write", "1"], cwd=tmp_path, stdout=subprocess.DEVNULL)
    try:
        wait_for(lambda: port_open(port), timeout=10, what="redis-server")
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_factorys_clients_raise_a_connection_error_and_reconnect_when_the_master_takes_no_writes(
    replicaless_master: int,
) -> None:
    handle = redis_settings_for_url(f"redis://127.0.0.1:{replicaless_master}/0").open()
    try:
        client = handle.client()
        assert client.ping(), "reads are served"
        with pytest.raises(MasterUnavailableError, match="NOREPLICAS"):
            client.lpush("q", "m")
        with pytest.raises(MasterUnavailableError, match="NOREPLICAS"):
            client.pipeline(transaction=False).lpush("q", "m").execute()
        with pytest.raises(MasterUnavailableError, match="NOREPLICAS"):
            client.eval("return redis.call('LPUSH', KEYS[1], 'm')", 1, "q")
        assert client.llen("q") == 0
    finally:
        handle.close()


def test_a_message_failing_alone_while_the_master_takes_no_writes_is_never_refused() -> None:
    sizer = BatchSizer(CeleryEventsConfig())
    batch = [object()]
    exc = MasterUnavailableError(NOREPLICAS)
    for _ in range(REFUSED_AFTER_ATTEMPTS * 3):
        assert sizer.after_failure(batch, 0, exc, reachable=lambda: True) == []  # type: ignore[arg-type]
    assert sizer.after_failure(batch, 0, redis.ConnectionError("reset"), reachable=lambda: True) == []  # type: ignore[arg-type]


def test_a_master_without_min_replicas_to_write_is_named_a_failover_hazard(replicaless_master: int) -> None:
    with redis.Redis(port=replicaless_master) as client:
        assert failover_hazard(client) is None
        client.config_set("min-replicas-to-write", 0)
        hazard = failover_hazard(client)
    assert hazard is not None
    assert "min-replicas-to-write 1" in hazard


def test_delivered_messages_are_left_in_unacked_when_the_connection_is_already_gone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """kombu's restore at channel close needs the connection's settings; once dropped, it stopped the worker."""
    from litestar_celery_events.runtime.redis_fetch import QoS

    channel = mock.Mock()
    channel.connection.client = None  # what kombu leaves after a lost connection was collected
    qos = QoS(channel)
    qos._delivered["tag-1"] = mock.Mock()
    with caplog.at_level("WARNING", logger="litestar_celery_events.worker"):
        qos.restore_unacked()
    assert not qos._delivered
    assert "come back after visibility_timeout" in caplog.text
    channel.conn_or_acquire.assert_not_called()


@pytest.mark.parametrize("settle", ["ack", "reject"])
def test_settling_a_message_after_its_connection_went_away_does_not_stop_the_worker(
    settle: str, caplog: pytest.LogCaptureFixture
) -> None:
    from litestar_celery_events.runtime.redis_fetch import QoS, owed_acks

    channel = mock.Mock()
    channel.connection.client = None  # the master was killed after the message was delivered
    qos = QoS(channel)
    qos._delivered["tag-1"] = mock.Mock()
    with caplog.at_level("WARNING", logger="litestar_celery_events.worker"):
        getattr(qos, settle)("tag-1")  # kombu's own raises AttributeError here and the worker stops
    assert "tag-1" not in qos._delivered
    assert "acknowledged on the next connection" in caplog.text
    channel.conn_or_acquire.assert_not_called()
    assert owed_acks.tags == {"tag-1"}, "its unacked record goes on the next connection"
    owed_acks.tags.clear()


class _Request:
    def __init__(self, tag: str) -> None:
        self.message = mock.Mock(delivery_tag=tag)


def test_at_channel_close_messages_whose_listeners_run_are_not_given_back(caplog: pytest.LogCaptureFixture) -> None:
    """Their acks come after the close (owed): given back to the queue, they ran twice after a failover."""
    from celery.worker.state import active_requests

    from litestar_celery_events.runtime.redis_fetch import QoS

    channel = mock.MagicMock(connection_errors=(ConnectionError,))
    qos = QoS(channel)
    qos._delivered.update({"running": mock.Mock(), "waiting": mock.Mock()})
    running = _Request("running")
    active_requests.add(running)
    restored: list[str] = []
    try:
        with mock.patch.object(QoS, "restore_by_tag", lambda self, tag, client=None: restored.append(tag)):
            qos.restore_unacked()
    finally:
        active_requests.discard(running)
    assert restored == ["waiting"], "only the message no listener took yet goes back to its queue"
    assert not qos._delivered


def test_a_batch_of_acks_the_broker_refuses_is_owed_and_paid_with_the_next_batch() -> None:
    """Async mode acknowledges in batches: refused ones (NOREPLICAS) are not given back at channel close."""
    from litestar_celery_events.runtime.acks import _BatchingAck
    from litestar_celery_events.runtime.redis_fetch import owed_acks

    qos = mock.MagicMock(unacked_key="unacked", unacked_index_key="unacked_index")
    qos.channel.connection_errors = (ConnectionError,)
    qos._delivered = {"a": object(), "b": object()}
    pipe = qos.channel.conn_or_acquire.return_value.__enter__.return_value.pipeline.return_value
    pipe.zrem.return_value.hdel.return_value.execute.side_effect = ConnectionError("NOREPLICAS")
    batcher = _BatchingAck(qos, hub=mock.Mock(), reserve=None)
    batcher.pending = ["a", "b"]
    batcher.flush()
    assert owed_acks.tags == {"a", "b"}
    assert qos._delivered == {}, "not given back to the queue when the channel closes"
    pipe.zrem.return_value.hdel.return_value.execute.side_effect = None
    batcher.pending = ["c"]
    try:
        batcher.flush()
        assert owed_acks.tags == set(), "paid before the next batch"
        paid = [c.args for c in pipe.zrem.call_args_list]
        assert ("unacked_index", "a", "b") in paid or ("unacked_index", "b", "a") in paid
        assert ("unacked_index", "c") in paid
    finally:
        owed_acks.tags.clear()
