"""Delayed events on RabbitMQ without worker memory: 28 levels of TTL queues (kombu's design).

A message delayed by ``d`` whole seconds carries the routing key ``b27.b26. ... .b0.<queue>``
(``d`` in binary). Level ``n``'s topic exchange routes it into level ``n``'s queue (TTL ``2**n``
s) when bit ``n`` is 1, else straight on to level ``n-1``; an expired message is dead-lettered to
the next level and, after level 0, to the delivery exchange, where each target queue is bound by
the exact pattern ``*`` x 28 + ``.<queue>``. So a message waits exactly ``d`` seconds in all (never
less), and no worker holds it meanwhile.

Unlike kombu, which publishes every message to level 27, the publisher enters at the level of
the delay's highest bit (same routing key, same path from there): each level skipped is an
exchange-to-exchange hop with topic matching at publish time. Measured here (RabbitMQ 3.10, a
loaded 2-core machine): 2,000 messages an hour ahead took ~5 s to settle entering at level 27,
under 1 s entering at level 11; 20,000 entering at level 27 stalled the publishing connection.

Names and queue arguments are those of ``kombu.transport.native_delayed_delivery`` with a prefix
(``<prefix>_celery_delayed_<level>``, ``<prefix>_celery_delayed_delivery``): Celery's own
topology stays apart. The few lines are vendored because kombu 5.4 has none of them, kombu's
declare opens a new channel per call (the publisher declares once per connection), and kombu's
bind skips direct exchanges (Celery's default), where binding the target queue itself works.
The levels are shared by every app on the vhost that uses the same prefix, by design: they hold
no app-specific state, and each message carries its own target queue in its routing key.
"""

from __future__ import annotations

import math
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

from amqp.exceptions import PreconditionFailed

from litestar_celery_events.brokers import MAX_AMQP_DELAY_S, redact_url

if TYPE_CHECKING:
    from celery import Celery
    from kombu.transport.pyamqp import Channel

__all__ = (
    "DEFAULT_DELAY_PREFIX",
    "DELAY_PREFIX_SETTING",
    "DELAY_QUEUE_TYPE_SETTING",
    "LEVELS",
    "MAX_DELAY_S",
    "DelayLevels",
    "DelayTopologyError",
    "delay_routing_key",
    "delivery_binding_key",
    "first_level",
    "seconds_until",
    "target_queue_problem",
)

LEVELS = 28
MAX_DELAY_S = MAX_AMQP_DELAY_S
assert MAX_DELAY_S == 2**LEVELS - 1
DEFAULT_DELAY_PREFIX = "celery_events"
DELAY_PREFIX_SETTING = "celery_events_delay_prefix"
"""Celery setting naming the levels (default ``celery_events``): apps sharing a vhost may share them."""
DELAY_QUEUE_TYPE_SETTING = "broker_native_delayed_delivery_queue_type"
"""Celery's own setting for its delay queues (``quorum`` by default), used for ours too."""
MAX_ROUTING_KEY_BYTES = 255
_BITS_PREFIX_BYTES = 2 * LEVELS


class DelayTopologyError(RuntimeError):
    """The delay levels cannot be declared as configured (a start-up error naming the fix)."""


def level_name(level: int, prefix: str) -> str:
    return f"{prefix}_celery_delayed_{level}"


def delivery_exchange_name(prefix: str) -> str:
    return f"{prefix}_celery_delayed_delivery"


def delay_routing_key(delay_s: int, queue: str) -> str:
    """The routing key of a message delayed by ``delay_s`` seconds for ``queue`` (kombu's format)."""
    if not 1 <= delay_s <= MAX_DELAY_S:
        raise ValueError(f"a delay must be 1..{MAX_DELAY_S} whole seconds, got {delay_s}")
    return ".".join(f"{delay_s:0{LEVELS}b}") + "." + queue


def first_level(delay_s: int) -> int:
    """The level a message delayed by ``delay_s`` seconds first waits in: its highest bit."""
    return delay_s.bit_length() - 1


def delivery_binding_key(queue: str) -> str:
    """Matches the messages for ``queue`` only (``#.<queue>`` would also match ``other.<queue>``)."""
    return "*." * LEVELS + queue


def target_queue_problem(queue: str) -> str | None:
    """Why messages for ``queue`` cannot travel the levels, or None."""
    if any(word in ("*", "#") for word in queue.split(".")):
        return f"queue name {queue!r} has a '*' or '#' word, which a topic binding reads as a wildcard"
    if len(queue.encode()) > MAX_ROUTING_KEY_BYTES - _BITS_PREFIX_BYTES:
        return f"queue name {queue!r} is over {MAX_ROUTING_KEY_BYTES - _BITS_PREFIX_BYTES} bytes"
    return None


def seconds_until(eta: str, now: float | None = None) -> int:
    """Whole seconds from now to ``eta`` (ISO 8601), rounded up so it never runs early; 0 if due."""
    remaining = datetime.fromisoformat(eta).timestamp() - (time.time() if now is None else now)
    return max(0, math.ceil(remaining))


class DelayLevels:
    """The levels of one prefix and queue type: declared once per channel, target queues bound once."""

    def __init__(self, prefix: str = DEFAULT_DELAY_PREFIX, queue_type: str = "quorum") -> None:
        if queue_type not in ("classic", "quorum"):
            raise DelayTopologyError(
                f"{DELAY_QUEUE_TYPE_SETTING}={queue_type!r}: the delay queues must be 'classic' or 'quorum'"
            )
        if not prefix or target_queue_problem(prefix):
            raise DelayTopologyError(f"{DELAY_PREFIX_SETTING}={prefix!r} cannot name the delay levels")
        self.prefix = prefix
        self.queue_type = queue_type
        self.top_exchange = level_name(LEVELS - 1, prefix)
        self._exchanges = [level_name(level, prefix) for level in range(LEVELS)]
        self.delivery_exchange = delivery_exchange_name(prefix)

    @classmethod
    def of(cls, celery_app: Celery) -> DelayLevels:
        conf = celery_app.conf
        return cls(
            str(conf.get(DELAY_PREFIX_SETTING) or DEFAULT_DELAY_PREFIX),
            str(conf.get(DELAY_QUEUE_TYPE_SETTING) or "quorum"),
        )

    def exchange_for(self, delay_s: int) -> str:
        """Where a message delayed by ``delay_s`` (1..MAX_DELAY_S) s is published: its first level's exchange."""
        return self._exchanges[first_level(delay_s)]

    def queue_arguments(self, level: int) -> dict[str, Any]:
        """kombu's arguments for level ``level``: TTL 2**level s, dead-lettered to the next level."""
        arguments: dict[str, Any] = {
            "x-queue-type": self.queue_type,
            "x-overflow": "reject-publish",
            "x-message-ttl": 2**level * 1000,
            "x-dead-letter-exchange": level_name(level - 1, self.prefix) if level else self.delivery_exchange,
        }
        if self.queue_type == "quorum":
            arguments["x-dead-letter-strategy"] = "at-least-once"  # not lost between two levels
        return arguments

    def names(self) -> list[str]:
        """Every exchange and queue name of the levels (each level has both), then the delivery exchange."""
        return [level_name(level, self.prefix) for level in range(LEVELS)] + [self.delivery_exchange]

    def declare(self, channel: Channel) -> None:
        """Declare every level (idempotent); ``DelayTopologyError`` if one exists with other arguments."""
        pattern = "1.#"
        for level in range(LEVELS - 1, -1, -1):
            name = level_name(level, self.prefix)
            channel.exchange_declare(exchange=name, type="topic", durable=True, auto_delete=False)
            arguments = self.queue_arguments(level)
            try:
                channel.queue_declare(queue=name, durable=True, auto_delete=False, arguments=arguments)
            except PreconditionFailed as exc:
                raise DelayTopologyError(
                    f"the delay queue {name!r} exists with other arguments ({redact_url(str(exc))}); set the Celery "
                    f"setting {DELAY_QUEUE_TYPE_SETTING} to the type it has, or {DELAY_PREFIX_SETTING} to another "
                    "prefix, or delete the old queues once they are empty"
                ) from exc
            channel.queue_bind(queue=name, exchange=name, routing_key=pattern)
            pattern = "*." + pattern
        pattern = "0.#"
        for level in range(LEVELS - 1, 0, -1):  # a 0 bit: straight on to the next level's exchange
            source, destination = level_name(level, self.prefix), level_name(level - 1, self.prefix)
            channel.exchange_bind(destination=destination, source=source, routing_key=pattern)
            pattern = "*." + pattern
        delivery = self.delivery_exchange
        channel.exchange_declare(exchange=delivery, type="topic", durable=True, auto_delete=False)
        channel.exchange_bind(destination=delivery, source=level_name(0, self.prefix), routing_key=pattern)

    def bind(self, channel: Channel, queue: str) -> None:
        """Deliver due messages for ``queue`` to it (the queue itself is bound: any exchange type works)."""
        problem = target_queue_problem(queue)
        if problem:
            raise DelayTopologyError(f"delayed events cannot reach {problem}; rename the queue")
        channel.queue_bind(queue=queue, exchange=self.delivery_exchange, routing_key=delivery_binding_key(queue))

    def waiting(self, channel: Channel) -> int:
        """Messages waiting in the levels (every app's that shares this prefix)."""
        return sum(
            int(channel.queue_declare(queue=level_name(level, self.prefix), passive=True).message_count)
            for level in range(LEVELS)
        )
