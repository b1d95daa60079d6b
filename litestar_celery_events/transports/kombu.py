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

if TYPE_CHECKING:
    from celery import Celery
    from kombu import Connection, Queue

__all__ = ("KombuTransport",)


class KombuTransport:
    """Publishes emissions as Celery protocol v2 messages through kombu (any broker Celery supports)."""

    def __init__(self, celery_app: Celery) -> None:
        self._app = celery_app
        self._origin = origin_nodename()
        self._connection: Connection | None = None
        self._producer: Producer | None = None
        self._declared: set[str] = set()
        self._default_queue: str = celery_app.conf.task_default_queue
        # RabbitMQ: delayed emissions wait in the delay levels, not in a worker (Celery's ETA).
        self._delays = DelayLevels.of(celery_app) if is_amqp_url(celery_app.conf.broker_url) else None
        self._delays_ready: set[str] = set()

    def _queue(self, name: str | None) -> Queue:
        return self._app.amqp.queues[name or self._default_queue]

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
        if len(batch) > 1 and getattr(producer, "supports_batch_publish", False):
            with producer.batch(max_size=len(batch)):
                for emission in batch:
                    self._publish_one(producer, emission)
            done[0] = len(batch)
        else:
            for emission in batch:
                self._publish_one(producer, emission)
                done[0] += 1

    def _publish_one(self, producer: Producer, emission: Emission) -> None:
        queue = self._queue(emission.queue)
        declare = None
        if queue.name not in self._declared:
            declare = [queue]
            self._declared.add(queue.name)
        exchange, routing_key = queue.exchange.name, queue.routing_key
        headers = task_headers(emission, self._origin)
        if emission.eta is not None and self._delays is not None:
            exchange, routing_key = self._delayed_route(producer, emission.eta, queue, headers)
        producer.publish(
            emission.body,
            exchange=exchange,
            routing_key=routing_key,
            headers=headers,
            content_type=CONTENT_TYPE,
            content_encoding=CONTENT_ENCODING,
            correlation_id=emission.emission_id,
            reply_to="",
            delivery_mode=2,
            declare=declare,
            retry=False,
        )

    def _delayed_route(self, producer: Producer, eta: str, queue: Queue, headers: dict[str, Any]) -> tuple[str, str]:
        """The first delay level of a message not yet due (its queue bound first), else the queue itself.

        The worker gets an ordinary message (no ``eta``: nothing held in its memory); ``due_at``
        tells the event task to check the cancel tombstone.
        """
        assert self._delays is not None
        headers["eta"] = None
        headers[DUE_AT_HEADER] = eta
        delay_s = seconds_until(eta)  # now, not at emit_later: the publisher may have waited
        if delay_s == 0:
            return queue.exchange.name, queue.routing_key
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
