"""Publisher confirms on RabbitMQ, with a scripted channel: what counts as published, what is sent again.

The same against a real RabbitMQ closing the connection mid-stream is in
tests/integration/test_rabbitmq_confirms.py.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import pytest
from celery import Celery

from litestar_celery_events.contract.message import Emission
from litestar_celery_events.transports.confirms import Confirms, PublishNotConfirmedError
from litestar_celery_events.transports.kombu import KombuTransport


class ScriptedChannel:
    """A py-amqp channel as far as confirms go: ``confirm_select`` and the ack/nack events."""

    def __init__(self) -> None:
        self.events: defaultdict[str, set[Callable[..., None]]] = defaultdict(set)
        self.confirming = False

    def confirm_select(self) -> None:
        self.confirming = True

    def ack(self, tag: int, multiple: bool = False) -> None:
        for callback in self.events["basic_ack"]:
            callback(tag, multiple)

    def nack(self, tag: int, multiple: bool = False) -> None:
        for callback in self.events["basic_nack"]:
            callback(tag, multiple)


def test_confirms_count_a_prefix_whatever_order_the_acks_come_in() -> None:
    channel = ScriptedChannel()
    confirms = Confirms(channel)
    assert channel.confirming
    channel.ack(2)
    channel.ack(3)
    assert confirms.confirmed_prefix(1, 5) == 0, "1 is not confirmed yet"
    channel.ack(1)
    assert confirms.confirmed_prefix(1, 5) == 3
    channel.ack(5, multiple=True)
    assert confirms.settled_through == 5
    assert confirms.confirmed_prefix(1, 5) == 5
    assert confirms.confirmed_prefix(4, 5) == 2


def test_a_nacked_message_ends_the_confirmed_prefix() -> None:
    channel = ScriptedChannel()
    confirms = Confirms(channel)
    channel.ack(2, multiple=True)
    channel.nack(3)
    channel.ack(6, multiple=True)
    assert confirms.settled_through == 6
    assert confirms.confirmed_prefix(1, 6) == 2
    channel.nack(8, multiple=True)  # 7 and 8
    assert confirms.nacked == {3, 7, 8}


class ScriptedConnection:
    """``drain_events`` hands the broker's next scripted reaction to the channel."""

    def __init__(self, reactions: list[Callable[[], None]]) -> None:
        self.reactions = reactions

    def drain_events(self, timeout: float) -> None:
        if not self.reactions:
            raise TimeoutError
        self.reactions.pop(0)()

    def release(self) -> None:
        pass


class Socket:
    def __init__(self, fail: bool) -> None:
        self.writes: list[bytes] = []
        self.fail = fail

    def write(self, data: bytes) -> None:
        if self.fail:
            raise ConnectionResetError("connection reset by peer")
        self.writes.append(data)


class RecordingProducer:
    """A producer on a py-amqp channel whose socket records (or refuses) what is written."""

    def __init__(self, fail: bool = False) -> None:
        self.channel = type("Channel", (), {"channel_id": 1})()
        self.channel.connection = type("AmqpConnection", (), {"frame_max": 131072, "bytes_sent": 0})()
        self.channel.connection.transport = Socket(fail)

    def maybe_declare(self, entity: object) -> None:
        pass


def _transport(channel: ScriptedChannel, producer: RecordingProducer, reactions: list[Callable[[], None]]) -> Any:
    transport = KombuTransport(Celery(set_as_current=False))
    transport._producer = producer  # type: ignore[assignment]
    transport._confirms = Confirms(channel)
    transport._connection = ScriptedConnection(reactions)  # type: ignore[assignment]
    return transport


def _batch(n: int) -> list[Emission]:
    return [Emission("e", f"id-{i}", "events.e", b"[[],{},{}]", (), {}) for i in range(n)]


def test_a_batch_counts_as_published_once_the_broker_confirmed_all_of_it() -> None:
    channel = ScriptedChannel()
    transport = _transport(
        channel, RecordingProducer(), [lambda: channel.ack(2, multiple=True), lambda: channel.ack(3)]
    )
    done = [0]
    transport.publish(_batch(3), done)
    assert done == [3]


def test_a_nack_sends_the_batch_again_from_the_refused_message_on() -> None:
    channel = ScriptedChannel()
    reactions = [lambda: channel.ack(1), lambda: channel.nack(2), lambda: channel.ack(3)]
    transport = _transport(channel, RecordingProducer(), reactions)
    done = [0]
    with pytest.raises(PublishNotConfirmedError, match="refused 2 of 3"):
        transport.publish(_batch(3), done)
    assert done == [1]


def test_a_connection_lost_while_writing_counts_nothing_of_the_batch_as_published() -> None:
    channel = ScriptedChannel()
    transport = _transport(channel, RecordingProducer(fail=True), [])
    done = [0]
    with pytest.raises(ConnectionResetError):
        transport.publish(_batch(6), done)
    assert done == [0]


def test_a_batch_goes_out_in_one_write_then_waits_for_its_confirms() -> None:
    channel = ScriptedChannel()
    producer = RecordingProducer()
    transport = _transport(channel, producer, [lambda: channel.ack(6, multiple=True)])
    done = [0]
    transport.publish(_batch(6), done)
    assert done == [6]
    assert len(producer.channel.connection.transport.writes) == 1


def test_confirms_that_never_come_fail_the_batch_after_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("litestar_celery_events.transports.confirms.CONFIRM_TIMEOUT_S", 0.05)
    channel = ScriptedChannel()
    transport = _transport(channel, RecordingProducer(), [lambda: channel.ack(1)])
    done = [0]
    with pytest.raises(PublishNotConfirmedError, match="confirmed 1 of 2"):
        transport.publish(_batch(2), done)
    assert done == [1]


def test_the_publishers_connection_is_named_and_kombus_own_per_message_confirms_are_off() -> None:
    app = Celery(set_as_current=False)
    app.conf.broker_transport_options = {"confirm_publish": True, "client_properties": {"product": "mine"}}
    transport = KombuTransport(app)
    options = transport._transport_options()
    assert options["confirm_publish"] is False
    assert options["client_properties"] == {"connection_name": transport.connection_name, "product": "mine"}
    assert transport.connection_name.startswith("litestar-celery-events publisher gen")
