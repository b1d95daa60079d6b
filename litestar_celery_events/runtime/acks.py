"""Acknowledgements in batches on Redis brokers: one round trip for all acks of a consumer tick.

kombu's Redis transport acknowledges each message with its own round trip (``ZREM`` + ``HDEL``
on the unacked index). With many listeners in flight the consumer thread, which also fetches
and reserves every message, spends a third of its time on them. Celery already runs every ack
on the consumer's event loop (``call_soon_ack``); this step makes each of those acks only note
the delivery tag, and removes the tags noted in the last few milliseconds (``ACK_WINDOW_S``, or
as soon as ``MAX_ACK_BATCH`` are waiting) in one pipeline. A message is still acknowledged only
after its listener finished; a process that dies before the flush has its messages redelivered,
as any unacknowledged message.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps
from kombu.transport.virtual import QoS as VirtualQoS

__all__ = ("BatchRedisAcks",)

logger = logging.getLogger("litestar_celery_events.worker")

ACK_WINDOW_S = 0.005
MAX_ACK_BATCH = 200


class _BatchingAck:
    """Replaces ``QoS.ack`` of one Redis channel; runs on the consumer's event loop (the hub)."""

    def __init__(self, qos: Any, hub: Any) -> None:
        self.qos = qos
        self.hub = hub
        self.original_ack = qos.ack
        self.pending: list[str] = []
        self.timer: Any = None

    def __call__(self, delivery_tag: str) -> None:
        self.pending.append(delivery_tag)
        if len(self.pending) >= MAX_ACK_BATCH:
            self.flush()
        elif self.timer is None:
            self.timer = self.hub.call_later(ACK_WINDOW_S, self.flush)

    def flush(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not self.pending:
            return
        tags, self.pending = self.pending, []
        qos = self.qos
        with qos.channel.conn_or_acquire() as client:
            pipe = client.pipeline()
            pipe.zrem(qos.unacked_index_key, *tags).hdel(qos.unacked_key, *tags).execute()
        for tag in tags:
            VirtualQoS.ack(qos, tag)  # what kombu's Redis QoS.ack does after its round trip: free the prefetch slot


class BatchRedisAcks(bootsteps.StartStopStep):  # type: ignore[misc]  # celery is untyped
    """Consumer step: batch the task consumer channel's acks when the broker is Redis."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.batcher: _BatchingAck | None = None

    def start(self, parent: Any) -> None:
        hub = getattr(parent, "hub", None)
        consumer = getattr(parent, "task_consumer", None)
        qos = getattr(getattr(consumer, "channel", None), "qos", None)
        if hub is None or qos is None or not hasattr(qos, "unacked_index_key"):
            return  # not kombu's Redis transport, or no event loop: acks stay as they are
        self.batcher = _BatchingAck(qos, hub)
        qos.ack = self.batcher

    def stop(self, parent: Any) -> None:
        batcher, self.batcher = self.batcher, None
        if batcher is None:
            return
        try:
            batcher.flush()
        except Exception:  # the broker is gone: the messages come back unacknowledged, as they should
            logger.warning("could not flush %d acknowledgement(s) at shutdown", len(batcher.pending), exc_info=True)
        batcher.qos.ack = batcher.original_ack

    shutdown = stop
