"""Publishes emissions as Celery protocol v2 messages through kombu (any broker Celery supports)."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from kombu import Producer

from litestar_celery_events.contract.message import CONTENT_ENCODING, CONTENT_TYPE, Emission, task_headers
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

    def _queue(self, name: str | None) -> Queue:
        return self._app.amqp.queues[name or self._default_queue]

    def _ensure_producer(self) -> Producer:
        if self._producer is None:
            connection = self._app.connection_for_write()
            connection.ensure_connection(max_retries=1)
            self._connection = connection
            self._producer = Producer(connection.default_channel, serializer="json")
            self._declared.clear()
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
        producer.publish(
            emission.body,
            exchange=queue.exchange.name,
            routing_key=queue.routing_key,
            headers=task_headers(emission, self._origin),
            content_type=CONTENT_TYPE,
            content_encoding=CONTENT_ENCODING,
            correlation_id=emission.emission_id,
            reply_to="",
            delivery_mode=2,
            declare=declare,
            retry=False,
        )

    def close(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):  # closing a broken connection must not raise
                self._connection.release()
        self._connection = None
        self._producer = None
