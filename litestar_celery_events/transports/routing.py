"""Where each message goes: the Celery app's own router and settings, resolved once per task name.

The publisher does not call ``apply_async``, so it must decide exactly what Celery would:
``router.route`` (``task_routes`` in its dict, string, list, glob and regex forms, ``task_queues``,
``task_create_missing_queues``, ``task_default_*``), the task's own options (``task_default_priority``,
a listener's ``queue`` and ``priority``) and then ``send_task_message``'s own rules (a direct
exchange becomes the default exchange with the queue name as routing key). On Redis it also
computes the list kombu's transport pushes onto (``priority_steps``, ``sep``, ``global_keyprefix``).

A route that only kombu can deliver (an exchange that fans out to several queues, a queue with
options the fast path does not model) gets no Redis key: the Redis transport hands that message
to kombu. Routers given as functions may look at the arguments: those are asked per message.
"""

from __future__ import annotations

from bisect import bisect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from celery.app.routes import MapRoute
from celery.exceptions import QueueNotFound
from kombu.common import Broadcast
from litestar.exceptions import ImproperlyConfiguredException

from litestar_celery_events.transports.base import MessageRefused

if TYPE_CHECKING:
    from celery import Celery
    from kombu import Queue

    from litestar_celery_events.contract.message import Emission

__all__ = ("Destination", "EventRouter", "Route", "redis_list_key", "route_all")

KOMBU_REDIS_SEP = "\x06\x16"
KOMBU_REDIS_PRIORITY_STEPS = (0, 3, 6, 9)
ROUTING_OPTIONS = ("queue", "exchange", "routing_key", "priority")
"""The task options (``Task._get_exec_options``) that decide where a message goes."""


@dataclass(frozen=True, slots=True)
class Destination:
    """Where Celery's ``send_task_message`` would publish a message of one task."""

    exchange: str
    """Its name; ``""``: the default exchange, where ``routing_key`` names the queue."""
    routing_key: str
    priority: int | None
    declare: tuple[Queue, ...]
    """Queues kombu declares before publishing (Celery declares the routed queue)."""
    redis_key: str | None
    """Redis brokers: the list kombu's transport pushes onto; ``None`` if only kombu can deliver it."""


class Route(Protocol):
    def __call__(self, emission: Emission) -> Destination:
        """Where ``emission`` goes; raises what Celery's router raises."""

    def check(self, emission: Emission) -> None:
        """Raise at ``emit`` if Celery cannot route this task."""


def route_all(route: Route, batch: list[Emission]) -> tuple[list[Destination], MessageRefused | None]:
    """The destinations of ``batch`` up to the first message Celery cannot route (a router function
    may refuse some arguments), and that refusal: such a message goes to the failed-events store."""
    destinations: list[Destination] = []
    try:
        for emission in batch:
            destinations.append(route(emission))
    except Exception as exc:  # noqa: BLE001 - whatever a user's router raises
        return destinations, MessageRefused(f"Celery's router cannot route it: {type(exc).__name__}: {exc}")
    return destinations, None


def redis_list_key(queue: str, priority: Any, transport_options: Mapping[str, Any]) -> str:
    """The Redis list kombu's transport LPUSHes a message of ``priority`` onto (``Channel._q_for_pri``)."""
    try:  # kombu's virtual channel: clamped to 0..9, anything unreadable is 0
        level = max(min(int(priority), 9), 0)
    except (TypeError, ValueError):
        level = 0
    steps = list(transport_options.get("priority_steps") or KOMBU_REDIS_PRIORITY_STEPS)
    step = steps[bisect(steps, level) - 1]
    sep = transport_options.get("sep", KOMBU_REDIS_SEP)
    prefix = transport_options.get("global_keyprefix", "")
    return f"{prefix}{queue}{sep}{step}" if step else f"{prefix}{queue}"


class EventRouter:
    """Resolves and caches the ``Destination`` of each task name from ``celery_app``'s settings.

    ``task_options`` maps a task name to its own Celery options (a listener's ``queue``/``priority``);
    every task also gets ``task_default_priority``, as a registered Celery task does.
    """

    def __init__(
        self, celery_app: Celery, task_options: Mapping[str, Mapping[str, Any]] | None = None, redis: bool = False
    ) -> None:
        self._app = celery_app
        self._task_options = dict(task_options or {})
        self._redis_options: Mapping[str, Any] | None = (
            dict(celery_app.conf.broker_transport_options or {}) if redis else None
        )
        self._cache: dict[Any, Destination] = {}
        self._checked: set[Any] = set()
        self._per_message: bool | None = None  # known at the first message: the app may still be configured

    def __call__(self, emission: Emission) -> Destination:
        key = emission.task_name if emission.queue is None else (emission.task_name, emission.queue)
        destination = self._cache.get(key)
        if destination is None:
            destination = self.resolve(emission.task_name, emission.queue, emission.args, emission.kwargs)
            if self._per_message is None:
                # A router function may look at the arguments: its answer cannot be kept per task name.
                self._per_message = any(not isinstance(r, MapRoute) for r in self._app.amqp.router.routes)
            if not self._per_message:
                self._cache[key] = destination
        return destination

    def check(self, emission: Emission) -> None:
        """At ``emit``: raise ``ImproperlyConfiguredException`` now if Celery cannot route this task (checked
        once per task name; a set lookup after)."""
        key = emission.task_name if emission.queue is None else (emission.task_name, emission.queue)
        if key in self._checked:
            return
        try:
            self(emission)
        except QueueNotFound as exc:
            raise ImproperlyConfiguredException(
                f"cannot emit event {emission.event_id!r}: {exc.args[0]} (Celery's routing of task "
                f"{emission.task_name!r}); add the queue to task_queues, or set task_create_missing_queues=True"
            ) from None
        self._checked.add(key)

    def task_options(self, task_name: str, queue: str | None = None) -> dict[str, Any]:
        """What ``send_task`` merges in for a registered task: its non-``None`` routing options."""
        options: dict[str, Any] = {"priority": self._app.conf.task_default_priority}
        options.update(self._task_options.get(task_name, {}))
        if queue is not None:
            options["queue"] = queue
        return {k: v for k, v in options.items() if k in ROUTING_OPTIONS and v is not None}

    def resolve(self, task_name: str, queue: str | None = None, args: Any = (), kwargs: Any = None) -> Destination:
        """``router.route`` then ``send_task_message``'s rules (celery/app/amqp.py), without publishing.

        Raises what Celery raises, e.g. ``QueueNotFound`` for a route to a queue missing from
        ``task_queues`` when ``task_create_missing_queues`` is off.
        """
        amqp = self._app.amqp
        options = amqp.router.route(self.task_options(task_name, queue), task_name, args, kwargs or {})
        target = options.get("queue")
        exchange = options.get("exchange")
        routing_key = options.get("routing_key")
        exchange_type = options.get("exchange_type")
        qname: str | None = None
        if target is None and exchange is None:
            target = amqp.default_queue
        if isinstance(target, str):
            qname, target = target, amqp.queues[target]
        elif target is not None:
            qname = target.name
        if exchange_type is None:
            exchange_type = target.exchange.type if target is not None and target.exchange else "direct"
        if (not exchange or not routing_key) and exchange_type == "direct":
            exchange, routing_key = "", qname
        elif exchange is None:
            exchange = target.exchange.name or amqp.default_exchange.name
            routing_key = routing_key or target.routing_key or self._app.conf.task_default_routing_key
        declare = (target,) if target is not None and not isinstance(target, Broadcast) else ()
        priority = options.get("priority")
        exchange_name = str(getattr(exchange, "name", exchange))  # an Exchange object: kombu publishes to its name
        return Destination(
            exchange=exchange_name,
            routing_key=str(routing_key or ""),
            priority=priority,
            declare=declare,
            redis_key=self._redis_key(exchange_name, qname, target, priority),
        )

    def _redis_key(self, exchange: str, qname: str | None, target: Queue | None, priority: Any) -> str | None:
        if self._redis_options is None or exchange != "" or not qname:
            return None  # a named exchange: its bindings (in Redis, maybe several queues) decide
        if target is not None and "x-expires" in (target.queue_arguments or {}):
            return None  # kombu also sets the list's expiry on each publish
        return redis_list_key(qname, priority, self._redis_options)
