"""Publishes emissions as Celery protocol v2 messages through kombu (any broker Celery supports).

On RabbitMQ (py-amqp) a message counts as sent only once the broker confirmed it (publisher
confirms): a batch is written in one go (``amqp_frames``: the bytes kombu would write), then the
confirms are awaited together, so a connection the broker closes mid-stream never swallows
events that were merely written to a socket.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from kombu import Producer

from litestar_celery_events.brokers import is_amqp_url
from litestar_celery_events.contract.message import (
    CONTENT_ENCODING,
    CONTENT_TYPE,
    DUE_AT_HEADER,
    Emission,
    task_headers,
)
from litestar_celery_events.transports.amqp_delay import DelayLevels, delay_routing_key, seconds_until
from litestar_celery_events.transports.amqp_frames import publish_frames
from litestar_celery_events.transports.base import origin_nodename
from litestar_celery_events.transports.confirms import Confirms, PublishNotConfirmedError
from litestar_celery_events.transports.routing import EventRouter, route_all

if TYPE_CHECKING:
    from collections.abc import Mapping

    from celery import Celery
    from kombu import Connection, Queue

    from litestar_celery_events.transports.routing import Destination, Route

__all__ = ("CONNECTION_NAME_PREFIX", "KombuTransport")

CONNECTION_NAME_PREFIX = "litestar-celery-events publisher"
"""The publisher's AMQP ``connection_name`` (``rabbitmqctl list_connections client_properties``)."""


class KombuTransport:
    """Publishes emissions as Celery protocol v2 messages through kombu (any broker Celery supports).

    Exchange, routing key, priority and the queues to declare come from ``route`` (the Celery
    app's own router and settings, see ``transports.routing``), as ``send_task`` would pick them.
    """

    def __init__(
        self,
        celery_app: Celery,
        task_options: Mapping[str, Mapping[str, Any]] | None = None,
        route: Route | None = None,
    ) -> None:
        self._app = celery_app
        self.route: Route = route or EventRouter(celery_app, task_options)
        self._origin = origin_nodename()
        self.connection_name = f"{CONNECTION_NAME_PREFIX} {self._origin}"
        self._connection: Connection | None = None
        self._producer: Producer | None = None
        self._confirms: Confirms | None = None
        self._declared: set[str] = set()
        # RabbitMQ: delayed emissions wait in the delay levels, not in a worker (Celery's ETA).
        self._delays = DelayLevels.of(celery_app) if is_amqp_url(celery_app.conf.broker_url) else None
        self._delays_ready: set[str] = set()

    def _ensure_producer(self) -> Producer:
        if self._producer is None:
            connection = self._app.connection_for_write(transport_options=self._transport_options())
            connection.ensure_connection(max_retries=1)
            self._connection = connection
            channel = connection.default_channel
            # py-amqp channels (RabbitMQ) confirm; others (filesystem, SQS, ...) publish as kombu does.
            self._confirms = Confirms(channel) if hasattr(channel, "confirm_select") else None
            self._producer = Producer(channel, serializer="json")
            self._declared.clear()
            self._delays_ready.clear()
        return self._producer

    def _transport_options(self) -> dict[str, Any]:
        options = dict(self._app.conf.broker_transport_options or {})
        # Our confirms are awaited per batch: kombu's own option would wait once per message.
        options["confirm_publish"] = False
        options["client_properties"] = {"connection_name": self.connection_name, **options.get("client_properties", {})}
        return options

    def publish(self, batch: list[Emission], done: list[int]) -> None:
        """Publish ``batch`` in order; ``done[0]`` counts those the broker took (kept correct if this raises).

        On RabbitMQ that is the confirmed prefix of the batch: what follows it is sent again.
        """
        producer = self._ensure_producer()
        destinations, unroutable = route_all(self.route, batch)
        if self._confirms is not None:
            self._publish_confirmed(producer, self._confirms, batch[: len(destinations)], destinations, done)
        elif len(destinations) > 1 and getattr(producer, "supports_batch_publish", False):
            with producer.batch(max_size=len(destinations)):
                for emission, destination in zip(batch, destinations, strict=False):
                    self.publish_to(producer, emission, destination)
            done[0] = len(destinations)
        else:
            for emission, destination in zip(batch, destinations, strict=False):
                self.publish_to(producer, emission, destination)
                done[0] += 1
        if unroutable is not None:
            raise unroutable

    def publish_one(self, emission: Emission, destination: Destination) -> None:
        """One message to an already resolved destination (the Redis transport's route to kombu)."""
        self.publish_to(self._ensure_producer(), emission, destination)

    def _publish_confirmed(
        self,
        producer: Producer,
        confirms: Confirms,
        batch: list[Emission],
        destinations: list[Destination],
        done: list[int],
    ) -> None:
        first = confirms.sent + 1
        try:
            self._write_batch(producer, batch, destinations)
            confirms.sent += len(batch)
            assert self._connection is not None  # set with the producer
            confirms.wait(self._connection, confirms.sent)
        finally:
            done[0] = confirms.confirmed_prefix(first, confirms.sent)
        if done[0] < len(batch):
            raise PublishNotConfirmedError(
                f"the broker refused {len(batch) - done[0]} of {len(batch)} message(s) (basic.nack); sending them again"
            )

    def _prepare(self, producer: Producer, emission: Emission, destination: Destination) -> tuple[str, str, Any]:
        """Exchange, routing key and headers of ``emission``: what both publish paths send."""
        exchange, routing_key = destination.exchange, destination.routing_key
        headers = task_headers(emission, self._origin)
        # The delay levels end in one queue by name: a route through an exchange that fans out keeps
        # Celery's eta instead, as send_task's countdown does.
        if emission.eta is not None and self._delays is not None and exchange == "" and destination.declare:
            exchange, routing_key = self._delayed_route(producer, emission.eta, destination, headers)
        return exchange, routing_key, headers

    def _write_batch(self, producer: Producer, batch: list[Emission], destinations: list[Destination]) -> None:
        """Every message of ``batch`` in one socket write (py-amqp writes one per message)."""
        channel = producer.channel
        connection = channel.connection  # py-amqp's, None once the broker closed it
        if connection is None:
            raise ConnectionError("the broker closed the channel")
        frames: list[bytes] = []
        for emission, destination in zip(batch, destinations, strict=True):
            declare = [queue for queue in destination.declare if queue.name not in self._declared]
            for queue in declare:
                producer.maybe_declare(queue)
            self._declared.update(queue.name for queue in declare)
            exchange, routing_key, headers = self._prepare(producer, emission, destination)
            frames.append(
                publish_frames(
                    channel.channel_id,
                    connection.frame_max,
                    exchange=exchange,
                    routing_key=routing_key,
                    priority=destination.priority,
                    body=emission.body,
                    headers=headers,
                    content_type=CONTENT_TYPE,
                    content_encoding=CONTENT_ENCODING,
                    correlation_id=emission.emission_id,
                )
            )
        connection.transport.write(b"".join(frames))
        connection.bytes_sent += 1  # py-amqp's heartbeat check reads it: we sent something

    def publish_to(self, producer: Producer, emission: Emission, destination: Destination) -> None:
        declare = [queue for queue in destination.declare if queue.name not in self._declared]
        exchange, routing_key, headers = self._prepare(producer, emission, destination)
        producer.publish(
            emission.body,
            exchange=exchange,
            routing_key=routing_key,
            priority=destination.priority,
            headers=headers,
            content_type=CONTENT_TYPE,
            content_encoding=CONTENT_ENCODING,
            correlation_id=emission.emission_id,
            reply_to="",
            delivery_mode=2,
            declare=declare or None,
            retry=False,
        )
        self._declared.update(queue.name for queue in declare)

    def reachable(self) -> bool:
        """True if a fresh connection to the broker opens now (tells a refused message from an outage)."""
        connection = self._app.connection_for_write()
        try:
            connection.ensure_connection(max_retries=1, timeout=5)
        except Exception:  # noqa: BLE001 - any failure means "not reachable now"
            return False
        finally:
            with contextlib.suppress(Exception):
                connection.release()
        return True

    def _delayed_route(
        self, producer: Producer, eta: str, destination: Destination, headers: dict[str, Any]
    ) -> tuple[str, str]:
        """The first delay level of a message not yet due (its queue bound first), else its own destination.

        The worker gets an ordinary message (no ``eta``: nothing held in its memory); ``due_at``
        tells the event task to check the cancel tombstone.
        """
        assert self._delays is not None
        queue: Queue = destination.declare[0]
        headers["eta"] = None
        headers[DUE_AT_HEADER] = eta
        delay_s = seconds_until(eta)  # now, not at emit_later: the publisher may have waited
        if delay_s == 0:
            return destination.exchange, destination.routing_key
        if queue.name not in self._delays_ready:
            channel = producer.channel
            if not self._delays_ready:
                self._delays.declare(channel)
            queue.bind(channel).declare()  # the queue must exist before a due message reaches it
            self._delays.bind(channel, queue.name)
            self._delays_ready.add(queue.name)
        return self._delays.exchange_for(delay_s), delay_routing_key(delay_s, queue.name)

    def close(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):  # closing a broken connection must not raise
                self._connection.release()
        self._connection = None
        self._producer = None
        self._confirms = None
