"""The RabbitMQ fast path writes exactly the bytes kombu's ``Producer.publish`` makes py-amqp write.

Both paths of ``KombuTransport`` run against one py-amqp channel whose socket is a buffer: the
generic one (``_publish_one``: kombu, then py-amqp's own frame writer) and the batched one
(``_write_batch``: ``amqp_frames``). A change to either (a header, a property, the routing) that
the other does not follow fails here.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import pytest
from amqp.method_framing import frame_writer
from celery import Celery
from kombu import Producer
from kombu.transport.pyamqp import Channel as PyAmqpChannel

from litestar_celery_events.contract.message import Emission
from litestar_celery_events.transports.kombu import KombuTransport
from litestar_celery_events.transports.routing import Destination

FRAME_MAX = 4096  # small, so a large body is split into several body frames


class BufferSocket:
    def __init__(self) -> None:
        self.written = bytearray()

    def write(self, data: bytes) -> None:
        self.written += bytes(data)

    def having_timeout(self, timeout: float | None) -> contextlib.nullcontext[None]:
        return contextlib.nullcontext()


class BufferConnection:
    """What a py-amqp channel needs of its connection to publish."""

    frame_max = FRAME_MAX
    client_properties: dict[str, Any] = {}  # noqa: RUF012 - read only

    def __init__(self) -> None:
        self.bytes_sent = 0
        self.transport = BufferSocket()
        self.frame_writer = frame_writer(self, self.transport)


def _channel() -> Any:
    channel = object.__new__(PyAmqpChannel)  # no handshake: nothing but publishing is used
    channel.connection = BufferConnection()
    channel.channel_id = 3
    return channel


BASE = Emission.create(
    "user_created",
    "events.user_created",
    ("ada@example.com",),
    {"n": 1},
    max_payload_bytes=10**6,
    queue="events-frames",
)
VARIANTS = {
    "plain": BASE,
    "eta and retries": dataclasses.replace(BASE, eta="2026-01-01T00:00:00+00:00", retries=2),
    "listeners header": dataclasses.replace(BASE, listeners=("mod.fn", "mod.other")),
    "extra headers": dataclasses.replace(
        BASE, extra_headers={"traceparent": "00-abc-def-01", "big": 2**40, "flag": False, "ratio": 0.5, "nested": {}}
    ),
    "non-ASCII": Emission.create(
        "commande_passée_✓", "events.commande_passée_✓", ("é",), {"ü": "✓"}, max_payload_bytes=10**6
    ),
    "body over frame_max": Emission.create(
        "user_created", "events.user_created", ("x" * 20_000,), {}, max_payload_bytes=10**6
    ),
}


@pytest.mark.parametrize("emission", VARIANTS.values(), ids=VARIANTS.keys())
def test_batched_frames_equal_what_kombu_and_py_amqp_write(emission: Emission) -> None:
    app = Celery(set_as_current=False)
    transport = KombuTransport(app)
    transport._declared.update({"events-frames", app.conf.task_default_queue})  # no broker to declare on

    destination = transport.route(emission)
    kombus = _channel()
    transport.publish_to(Producer(kombus, serializer="json"), emission, destination)
    ours = _channel()
    transport._write_batch(Producer(ours, serializer="json"), [emission], [destination])

    assert bytes(ours.connection.transport.written) == bytes(kombus.connection.transport.written)
    assert len(kombus.connection.transport.written) > len(emission.body)


def test_a_batch_is_one_write_of_every_message_in_order() -> None:
    transport = KombuTransport(Celery(set_as_current=False))
    transport._declared.update({"events-frames", "celery"})
    batch = [dataclasses.replace(BASE, emission_id=f"id-{n}") for n in range(3)]
    kombus, ours = _channel(), _channel()
    destinations = [transport.route(emission) for emission in batch]
    for emission, destination in zip(batch, destinations, strict=True):
        transport.publish_to(Producer(kombus, serializer="json"), emission, destination)
    writes: list[bytes] = []
    ours.connection.transport.write = writes.append
    transport._write_batch(Producer(ours, serializer="json"), batch, destinations)
    assert writes == [bytes(kombus.connection.transport.written)]


@pytest.mark.parametrize("priority", [None, 0, 9], ids=["no priority", "priority 0", "priority 9"])
def test_both_paths_agree_on_any_route(priority: int | None) -> None:
    app = Celery(set_as_current=False)
    transport = KombuTransport(app)
    routed = Destination("events.topic", "user.created", priority, (), None)
    kombus, ours = _channel(), _channel()
    transport.publish_to(Producer(kombus, serializer="json"), BASE, routed)
    transport._write_batch(Producer(ours, serializer="json"), [BASE], [routed])
    assert bytes(ours.connection.transport.written) == bytes(kombus.connection.transport.written)
