"""Publishes emissions as Celery protocol v2 messages through kombu (any broker Celery supports)."""

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
from litestar_celery_events.transports.base import origin_nodename
from litestar_celery_events.transports.routing import EventRouter, route_all

if TYPE_CHECKING:
    from collections.abc import Mapping

    from celery import Celery
    from kombu import Connection, Queue

    from litestar_celery_events.transports.routing import Destination, Route

__all__ = ("KombuTransport",)


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
        self._connection: Connection | None = None
        self._producer: Producer | None = None
        self._declared: set[str] = set()
        # RabbitMQ: delayed emissions wait in the delay levels, not in a worker (Celery's ETA).
        self._delays = DelayLevels.of(celery_app) if is_amqp_url(celery_app.conf.broker_url) else None
        self._delays_ready: set[str] = set()

    def _ensure_producer(self) -> Producer:
        if self._producer is None:
            connection = self._app.connection_for_write()
            connection.ensure_connection(max_retries=1)
            self._connection = connection
            self._producer = Producer(connection.default_channel, serializer="json")
            self._declared.clear()
            self._delays_ready.clear()
        return self._producer

    def publish(self, batch: list[Emission], done: list[int]) -> None:
        """Publish ``batch`` in order; ``done[0]`` counts those sent (kept correct if this raises)."""
        producer = self._ensure_producer()
        destinations, unroutable = route_all(self.route, batch)
        if len(destinations) > 1 and getattr(producer, "supports_batch_publish", False):
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

    def publish_to(self, producer: Producer, emission: Emission, destination: Destination) -> None:
        declare = [queue for queue in destination.declare if queue.name not in self._declared]
        exchange, routing_key = destination.exchange, destination.routing_key
        headers = task_headers(emission, self._origin)
        # The delay levels end in one queue by name: a route through an exchange that fans out keeps
        # Celery's eta instead, as send_task's countdown does.
        if emission.eta is not None and self._delays is not None and exchange == "" and destination.declare:
            exchange, routing_key = self._delayed_route(producer, emission.eta, destination, headers)
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
