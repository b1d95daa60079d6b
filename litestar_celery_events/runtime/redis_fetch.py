"""The worker's Redis transport: kombu's, except that taking a message also records it as unacknowledged.

kombu's Redis channel takes a message with ``BRPOP`` and only then records it in its ``unacked``
hash: a worker whose main process dies in between (SIGKILL, the OOM killer, a lost machine) loses
that message for good, whatever ``acks_late`` says (celery/celery#1392; the soak lost one event in
about a third of its whole-worker SIGKILLs). Here one Lua script takes the next message of the
channel's queues, in ``BRPOP``'s order, and records it in ``unacked`` in the same step, so a
message is always either in its queue or in ``unacked``, from where kombu restores it after
``visibility_timeout``. While the queues are empty the channel waits with ``BLMOVE q q RIGHT
RIGHT`` on its first queue (a wait that takes nothing) for up to ``IDLE_WAIT_S``, then looks at
every queue again. Needs Redis >= 6.2 (``BLMOVE``); on an older server the channel is kombu's.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from kombu.transport import redis as kombu_redis
from kombu.utils.json import loads

from litestar_celery_events.brokers import is_redis_url
from litestar_celery_events.brokers.failover import (
    FailoverAwareConnection,
    FailoverAwareSentinelConnection,
    FailoverAwareSentinelSSLConnection,
    FailoverAwareSSLConnection,
)

if TYPE_CHECKING:
    from celery import Celery

__all__ = (
    "IDLE_WAIT_S",
    "OwedAcks",
    "RELIABLE_REDIS_TRANSPORT",
    "RELIABLE_SENTINEL_TRANSPORT",
    "SentinelTransport",
    "Transport",
    "owed_acks",
    "use_reliable_fetch",
)

logger = logging.getLogger("litestar_celery_events.worker")

RELIABLE_REDIS_TRANSPORT = "litestar_celery_events.runtime.redis_fetch:Transport"
"""The ``broker_transport`` the worker sets for a ``redis://``/``rediss://`` broker."""
RELIABLE_SENTINEL_TRANSPORT = "litestar_celery_events.runtime.redis_fetch:SentinelTransport"
"""The same for a ``sentinel://`` broker."""
IDLE_WAIT_S = 0.1
"""An idle worker sees a message on its first queue at once, on its other queues (or priority
levels) within this long."""

# KEYS: the queue keys in BRPOP order, then the unacked hash and its index. ARGV: the queue name
# of each key, then the time. Returns {queue name, message} or nil. Records what kombu's
# QoS.append would (unacked[tag] = [message, exchange, routing key], unacked_index[tag] = time)
# before it pops: a refused write (Redis out of memory) leaves the message in its queue. A message
# that is not kombu's JSON is popped unrecorded (kombu's own channel loses it too).
_TAKE = """
local queues = #KEYS - 2
for i = 1, queues do
  local payload = redis.call('LINDEX', KEYS[i], -1)
  if payload then
    local ok, message = pcall(cjson.decode, payload)
    local properties = ok and type(message) == 'table' and message['properties']
    local tag = type(properties) == 'table' and properties['delivery_tag']
    if type(tag) == 'string' then
      local delivery = type(properties['delivery_info']) == 'table' and properties['delivery_info'] or {}
      redis.call('ZADD', KEYS[queues + 2], ARGV[queues + 1], tag)
      redis.call('HSET', KEYS[queues + 1], tag,
        '[' .. payload .. ',' .. cjson.encode(delivery['exchange'] or '') .. ','
        .. cjson.encode(delivery['routing_key'] or '') .. ']')
    end
    redis.call('RPOP', KEYS[i])
    return {ARGV[i], payload}
  end
end
return false
"""


def use_reliable_fetch(celery_app: Celery) -> None:
    """A worker on a Redis broker takes messages with this module's channel (unless a transport is set).

    ``redis+socket://`` stays kombu's: kombu takes the transport from such a URL's scheme.
    """
    url = str(celery_app.conf.broker_url or "")
    if celery_app.conf.broker_transport or not is_redis_url(url):
        return
    scheme = url.split(";", 1)[0].partition("://")[0].lower()
    if scheme in ("redis", "rediss"):
        celery_app.conf.broker_transport = RELIABLE_REDIS_TRANSPORT
    elif scheme == "sentinel":
        celery_app.conf.broker_transport = RELIABLE_SENTINEL_TRANSPORT


class OwedAcks:
    """Acknowledgements the broker refused after the listener finished: no writes while a Sentinel
    failover is under way (``NOREPLICAS``), or the connection lost. kombu keeps such a message among
    the channel's delivered ones and puts it back in its queue when the channel closes, so it ran
    again after the failover. An owed message is no longer the channel's to give back: its record
    in ``unacked`` is removed on the next connection that takes writes (before the next ack, or
    before ``restore_visible`` could bring it back)."""

    def __init__(self) -> None:
        self.tags: set[str] = set()

    def owe(self, qos: Any, tags: list[str], why: str) -> None:
        for tag in tags:
            qos._delivered.pop(tag, None)  # not restored when the channel closes: it ran
        self.tags.update(tags)
        logger.warning(
            "%d message(s) whose listeners finished could not be acknowledged (%s); they are acknowledged "
            "on the next connection that takes writes, not run again",
            len(tags),
            why,
        )

    def pay(self, qos: Any) -> None:
        """Remove the owed records from ``unacked``; raises (and owes on) while the broker takes no writes."""
        if not self.tags:
            return
        tags = list(self.tags)
        with qos.channel.conn_or_acquire() as client:
            client.pipeline().zrem(qos.unacked_index_key, *tags).hdel(qos.unacked_key, *tags).execute()
        self.tags.difference_update(tags)
        logger.info("acknowledged %d message(s) the broker had refused to acknowledge", len(tags))


owed_acks = OwedAcks()
"""One per worker process (its consumer acknowledges; a new channel after a reconnect pays)."""


def _running_delivery_tags() -> set[str]:
    """Delivery tags of the messages whose tasks this worker runs now (or just ran, ack pending); none
    in a cold shutdown, which kills them (kombu gives them back at once, as it should)."""
    from celery.worker import state

    if state.should_terminate:
        return set()
    tags = set()
    for request in list(state.active_requests):
        tag = getattr(getattr(request, "message", None), "delivery_tag", None)
        if tag is not None:
            tags.add(tag)
    return tags


class QoS(kombu_redis.QoS):  # type: ignore[misc]  # kombu is untyped
    def restore_unacked(self, client: Any = None) -> None:
        """Give the delivered, unacknowledged messages back when the channel closes, if the broker is there.

        Not those whose listener runs or has just finished (Celery's active requests): their acks come
        after the channel closed and are owed (``OwedAcks``); given back, they ran twice (seen when a
        Sentinel failover cut the connection between a listener's end and its ack).

        kombu's tries even after the connection was torn down (its pool is gone; a new one needs the
        connection's settings, already dropped: ``AttributeError: 'NoneType' object has no attribute
        'hostname'``), and that error stops the worker: seen when the master is killed mid-stream.
        The messages stay recorded in ``unacked``, from where ``restore_visible`` brings them back.
        """
        for tag in _running_delivery_tags().intersection(self._delivered):
            del self._delivered[tag]  # stays in unacked until its ack (or visibility_timeout)
        transport = getattr(self.channel, "connection", None)
        if transport is None or getattr(transport, "client", None) is None:
            logger.warning(
                "%d delivered message(s) not restored now (the broker connection is gone); they come back "
                "after visibility_timeout",
                len(self._delivered),
            )
            self._delivered.clear()
            return
        try:
            super().restore_unacked(client)
        except self.channel.connection_errors as exc:
            logger.warning(
                "%d delivered message(s) not restored now (%s); they come back after visibility_timeout",
                len(self._delivered), exc,
            )  # fmt: skip
            self._delivered.clear()

    def ack(self, delivery_tag: Any) -> None:
        if self._torn_down("acknowledged", delivery_tag):
            return
        try:
            owed_acks.pay(self)
            super().ack(delivery_tag)
        except self.channel.connection_errors as exc:
            owed_acks.owe(self, [delivery_tag], type(exc).__name__)

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        if self._torn_down("rejected", delivery_tag):
            return
        if requeue:
            super().reject(delivery_tag, requeue=True)
            return
        try:  # a rejection removes the record as an ack does (the listener failed for good)
            owed_acks.pay(self)
            super().reject(delivery_tag)
        except self.channel.connection_errors as exc:
            owed_acks.owe(self, [delivery_tag], type(exc).__name__)

    def restore_visible(self, *args: Any, **kwargs: Any) -> None:
        try:
            owed_acks.pay(self)  # an owed message is never restored here
        except self.channel.connection_errors:
            return  # no writes now: nothing can be restored either
        super().restore_visible(*args, **kwargs)

    def _torn_down(self, what: str, delivery_tag: Any) -> bool:
        """A message delivered on a channel whose connection is gone since (the master killed): kombu's
        ack would need that connection's settings and stops the worker (``AttributeError: 'NoneType'
        object has no attribute 'client'``). It stays in ``unacked`` and comes back after
        visibility_timeout (at-least-once; the ledger skips listeners that completed)."""
        transport = getattr(self.channel, "connection", None)
        if transport is not None and getattr(transport, "client", None) is not None:
            return False
        owed_acks.owe(self, [delivery_tag], f"{what} after its broker connection was gone")
        return True

    def append(self, message: Any, delivery_tag: Any) -> None:
        if self.channel.took_recorded(delivery_tag):  # the Lua script recorded it already
            kombu_redis.virtual.QoS.append(self, message, delivery_tag)
        else:
            super().append(message, delivery_tag)


class Channel(kombu_redis.Channel):  # type: ignore[misc]  # kombu is untyped
    QoS = QoS
    # NOREPLICAS/MASTERDOWN/READONLY while failing over: a lost connection (Celery reconnects), not a
    # channel error (with kombu's classes the worker stops: "Unrecoverable error: ResponseError").
    connection_class: type[Any] = FailoverAwareConnection
    connection_class_ssl: type[Any] = FailoverAwareSSLConnection

    _reliable: bool | None = None
    _waiting = False  # the command in flight is the idle wait (BLMOVE), not the take script
    _recorded: set[Any]

    def took_recorded(self, delivery_tag: Any) -> bool:
        """True while the message the Lua script took (and recorded) is being delivered."""
        recorded = self.__dict__.get("_recorded")
        return recorded is not None and delivery_tag in recorded

    def _is_reliable(self) -> bool:
        if self._reliable is None:
            version = str(self.client.info("server").get("redis_version", "0"))
            self._reliable = tuple(int(p) for p in version.split(".")[:2] if p.isdigit()) >= (6, 2)
            self._recorded = set()
        return self._reliable

    def _brpop_start(self, timeout: float | None = None) -> None:
        if not self._is_reliable():
            super()._brpop_start(timeout)
            return
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        prefix = self.global_keyprefix
        connection = self.client.connection
        self._in_poll = connection
        self._brpop_sent_at = time.monotonic()
        if self._waiting:
            first = prefix + self._q_for_pri(queues[0], self.priority_steps[0])
            connection.send_command("BLMOVE", first, first, "RIGHT", "RIGHT", IDLE_WAIT_S)
            return
        names = [(queue, self._q_for_pri(queue, pri)) for pri in self.priority_steps for queue in queues]
        keys = [prefix + key for _, key in names] + [prefix + self.unacked_key, prefix + self.unacked_index_key]
        connection.send_command("EVAL", _TAKE, len(keys), *keys, *(queue for queue, _ in names), time.time())

    def _brpop_read(self, **options: Any) -> bool:
        if not self._reliable:
            return bool(super()._brpop_read(**options))
        try:
            try:
                reply = self.client.parse_response(self.client.connection, "BLMOVE" if self._waiting else "EVAL")
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if self._waiting:  # something arrived, or the wait timed out: look at every queue again
                self._waiting = False
                raise kombu_redis.Empty()
            if not reply:
                self._waiting = True
                raise kombu_redis.Empty()
            queue, payload = (part.decode() if isinstance(part, bytes) else part for part in reply)
            message = loads(payload)
            tag = message.get("properties", {}).get("delivery_tag")
            if isinstance(tag, str):  # what the Lua script recorded
                self._recorded.add(tag)
            try:
                self._queue_cycle.rotate(queue)
                self.connection._deliver(message, queue)  # QoS.append runs in here
            finally:
                # Not in QoS.append: the async mode's pipelined reservation replaces it (and records again).
                self._recorded.discard(tag)
            return True
        finally:
            self._in_poll = None
            flush_reauth = getattr(self, "_flush_brpop_reauth", None)  # kombu >= 5.7: a waiting AUTH, now idle
            if flush_reauth is not None:
                flush_reauth()


class SentinelChannel(Channel, kombu_redis.SentinelChannel):  # type: ignore[misc]
    """The same over Sentinel (its connection pool is kombu's Sentinel one)."""

    connection_class = FailoverAwareSentinelConnection
    connection_class_ssl = FailoverAwareSentinelSSLConnection


class Transport(kombu_redis.Transport):  # type: ignore[misc]  # kombu is untyped
    Channel = Channel


class SentinelTransport(kombu_redis.SentinelTransport):  # type: ignore[misc]
    Channel = SentinelChannel
