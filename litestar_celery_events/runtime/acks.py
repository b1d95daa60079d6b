"""Reservations without waiting and acknowledgements in batches on Redis brokers (async mode).

kombu's Redis transport acknowledges each message with its own round trip (``ZREM`` + ``HDEL``
on the unacked index). With many listeners in flight the consumer thread, which also fetches
and reserves every message, spends a third of its time on them. Celery already runs every ack
on the consumer's event loop (``call_soon_ack``); this step makes each of those acks only note
the delivery tag, and removes the tags noted in the last few milliseconds (``ACK_WINDOW_S``, or
as soon as ``MAX_ACK_BATCH`` are waiting) in one pipeline. A message is still acknowledged only
after its listener finished; a process that dies before the flush has its messages redelivered,
as any unacknowledged message.

Reservation: before Celery sees a message, kombu records it as unacknowledged (``ZADD`` +
``HSET`` in ``MULTI``/``EXEC``) and waits for the reply: a round trip per message on the
consumer thread. ``_PipelinedReserve`` writes the same commands (kombu's record format) on a
connection of their own and reads the replies later, before the next acks are flushed (so an
ack never overtakes its reservation) or as they arrive. The commands are on the wire before the
message is handed to Celery, so a process that dies right after still leaves the record for
redelivery, as with kombu; an error reply raises on the consumer thread (the consumer then
reconnects, as after any broker error). Not used with ``global_keyprefix``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import bootsteps
from kombu.transport.virtual import QoS as VirtualQoS
from kombu.utils.json import dumps

from litestar_celery_events.runtime.redis_fetch import owed_acks

__all__ = ("BatchRedisAcks",)

logger = logging.getLogger("litestar_celery_events.worker")

ACK_WINDOW_S = 0.005
MAX_ACK_BATCH = 200
MAX_UNREAD_REPLIES = 4_000
"""Replies of reservations left unread before the consumer waits for them (4 per message)."""
REPLIES_PER_RESERVATION = 4  # MULTI, QUEUED, QUEUED, EXEC


class _PipelinedReserve:
    """Replaces ``QoS.append`` of one Redis channel: send the record, read the reply later."""

    def __init__(self, qos: Any) -> None:
        self.qos = qos
        self.original_append = qos.append
        pool = qos.channel.client.connection_pool
        try:
            self.connection = pool.get_connection()
        except TypeError:  # redis-py before 5.3 wants a command name
            self.connection = pool.get_connection("_")
        self.pool = pool
        self.unread = 0

    def __call__(self, message: Any, delivery_tag: str) -> None:
        if self.unread:
            self.drain(wait=self.unread >= MAX_UNREAD_REPLIES)
        delivery = message.delivery_info
        record = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
        qos = self.qos
        commands = [
            ("MULTI",),
            ("ZADD", qos.unacked_index_key, time.time(), delivery_tag),
            ("HSET", qos.unacked_key, delivery_tag, record),
            ("EXEC",),
        ]
        self.connection.send_packed_command(self.connection.pack_commands(commands))
        self.unread += REPLIES_PER_RESERVATION
        VirtualQoS.append(qos, message, delivery_tag)

    def drain(self, wait: bool = True) -> None:
        """Read the replies waiting (all of them if ``wait``); an error reply raises."""
        while self.unread and (wait or self.connection.can_read(timeout=0)):
            reply = self.connection.read_response()
            self.unread -= 1
            if isinstance(reply, list):  # EXEC: errors of the queued commands come back inside it
                for item in reply:
                    if isinstance(item, Exception):
                        raise item

    def close(self) -> None:
        try:
            self.drain()
        finally:
            self.qos.append = self.original_append
            self.pool.release(self.connection)


class _BatchingAck:
    """Replaces ``QoS.ack`` of one Redis channel; runs on the consumer's event loop (the hub)."""

    def __init__(self, qos: Any, hub: Any, reserve: _PipelinedReserve | None) -> None:
        self.qos = qos
        self.hub = hub
        self.reserve = reserve
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
        if self.reserve is not None:
            self.reserve.drain()  # every reservation is in Redis before any ack of it
        qos = self.qos
        try:
            owed_acks.pay(qos)
            with qos.channel.conn_or_acquire() as client:
                pipe = client.pipeline()
                pipe.zrem(qos.unacked_index_key, *tags).hdel(qos.unacked_key, *tags).execute()
        except qos.channel.connection_errors as exc:
            owed_acks.owe(qos, tags, type(exc).__name__)
            return
        for tag in tags:
            VirtualQoS.ack(qos, tag)  # what kombu's Redis QoS.ack does after its round trip: free the prefetch slot


class BatchRedisAcks(bootsteps.StartStopStep):  # type: ignore[misc]  # celery is untyped
    """Consumer step: pipelined reservations and batched acks on the task channel (Redis only)."""

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
        reserve = None if qos.channel.global_keyprefix else _PipelinedReserve(qos)
        if reserve is not None:
            qos.append = reserve
        self.batcher = _BatchingAck(qos, hub, reserve)
        qos.ack = self.batcher

    def stop(self, parent: Any) -> None:
        batcher, self.batcher = self.batcher, None
        if batcher is None:
            return
        try:
            batcher.flush()
            if batcher.reserve is not None:
                batcher.reserve.close()
        except Exception:  # the broker is gone: the messages come back unacknowledged, as they should
            logger.warning("could not flush %d acknowledgement(s) at shutdown", len(batcher.pending), exc_info=True)
        batcher.qos.ack = batcher.original_ack

    shutdown = stop
