"""Routing decided as Celery decides: the router against ``send_task`` on an in-memory broker.

``send_task`` on ``memory://`` runs Celery's whole publish path; ``before_task_publish`` shows
the exchange, routing key, declared queues and priority it chose. The Redis list names are
checked against kombu's own ``Channel._q_for_pri``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery, signals
from celery.exceptions import QueueNotFound
from kombu import Exchange, Queue
from kombu.transport.redis import Channel as KombuRedisChannel
from litestar.exceptions import ImproperlyConfiguredException

from litestar_celery_events import CeleryEventsConfig
from litestar_celery_events.celery_app import build_celery_app
from litestar_celery_events.contract.message import Emission
from litestar_celery_events.transports.routing import EventRouter, redis_list_key

TOPIC = Exchange("fan", type="topic")


def args_router(name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **_: Any) -> dict[str, Any]:
    return {"queue": "big" if kwargs.get("n", 0) > 10 else "small"}


CONFIGS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "task_routes-dict-glob": {"task_routes": {"events.*": {"queue": "routed"}}},
    "task_routes-dict-str-value": {"task_routes": {"events.signup": "routed"}},
    "task_routes-list": {"task_routes": [{"other": "x"}, {"events.*": {"queue": "routed", "priority": 2}}]},
    "task_routes-regex": {"task_routes": {re.compile(r"events\.sign.*"): {"queue": "rx"}}},
    "task_default_queue": {"task_default_queue": "work"},
    "task_default_priority": {"task_default_priority": 5},
    "task_default_exchange-topic": {"task_default_exchange_type": "topic", "task_default_routing_key": "events.x"},
    "task_queues-topic": {
        "task_queues": [Queue("a", TOPIC, routing_key="events.#"), Queue("b", TOPIC, routing_key="events.#")],
        "task_routes": {"events.*": {"queue": "a"}},
        "task_default_queue": "a",
    },
    "route-to-exchange": {
        "task_routes": {"events.*": {"exchange": "fan", "exchange_type": "topic", "routing_key": "e.s"}}
    },
}


def _noop(**kwargs: Any) -> None:
    """The body of the tasks registered here (never run)."""


@pytest.fixture
def captured() -> Iterator[list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []

    def capture(**kwargs: Any) -> None:
        seen.append(kwargs)

    signals.before_task_publish.connect(capture, weak=False)
    yield seen
    signals.before_task_publish.disconnect(capture)


def _app(settings: dict[str, Any]) -> Celery:
    app = Celery(set_as_current=False)
    app.conf.broker_url = "memory://"
    app.conf.update(settings)
    return app


def _celery_choice(app: Celery, captured: list[dict[str, Any]], name: str, **options: Any) -> tuple[Any, ...]:
    task = app.task(name=name, shared=False, **options)(_noop)
    app.finalize()  # registered now, as in a worker
    # apply_async applies the task's own options on every supported Celery; send_task does not on 5.4.
    task.apply_async(kwargs={"n": 1})
    sent = captured.pop()
    exchange = sent["exchange"]
    return (
        getattr(exchange, "name", exchange),
        sent["routing_key"],
        sent["properties"].get("priority"),
        tuple(q.name for q in sent["declare"] or ()),
    )


@pytest.mark.parametrize("settings", list(CONFIGS.values()), ids=list(CONFIGS))
def test_an_event_task_is_routed_exactly_as_send_task_routes_it(
    settings: dict[str, Any], captured: list[dict[str, Any]]
) -> None:
    app = _app(settings)
    destination = EventRouter(app).resolve("events.signup", kwargs={"n": 1})
    exchange = getattr(destination.exchange, "name", destination.exchange)
    ours = (exchange, destination.routing_key, destination.priority, tuple(q.name for q in destination.declare))
    assert ours == _celery_choice(app, captured, "events.signup")


def test_a_listener_task_gets_its_own_queue_and_priority_as_a_registered_task_would(
    captured: list[dict[str, Any]],
) -> None:
    app = _app({"task_default_priority": 3})
    name = "events.signup[mod.listener]"
    router = EventRouter(app, {name: {"queue": "mail", "priority": 7}})
    destination = router.resolve(name)
    ours = (
        destination.exchange,
        destination.routing_key,
        destination.priority,
        tuple(q.name for q in destination.declare),
    )
    assert ours == _celery_choice(app, captured, name, queue="mail", priority=7)


def test_a_router_function_is_asked_per_message_with_the_arguments() -> None:
    app = _app({"task_routes": f"{__name__}.args_router"})
    router = EventRouter(app, redis=True)

    def emission(n: int) -> Emission:
        return Emission.create("signup", "events.signup", (), {"n": n}, max_payload_bytes=1000)

    assert router(emission(1)).redis_key == "small"
    assert router(emission(11)).redis_key == "big"


def test_routes_of_a_dict_are_resolved_once_per_task_name() -> None:
    router = EventRouter(_app({"task_routes": {"events.*": "routed"}}), redis=True)
    first = Emission.create("signup", "events.signup", (), {}, max_payload_bytes=1000)
    second = Emission.create("signup", "events.signup", (), {"n": 2}, max_payload_bytes=1000)
    assert router(first) is router(second)
    assert router(first).redis_key == "routed"


def test_a_route_to_a_queue_missing_from_task_queues_raises_celerys_error() -> None:
    app = _app({"task_routes": {"events.*": "nowhere"}, "task_create_missing_queues": False})
    with pytest.raises(QueueNotFound, match="nowhere"):
        EventRouter(app).resolve("events.signup")


@pytest.mark.parametrize(
    ("options", "priority"),
    [
        ({}, None),
        ({}, 0),
        ({}, 5),
        ({}, 9),
        ({}, 12),
        ({"priority_steps": [1, 5, 9]}, 0),
        ({"priority_steps": [1, 5, 9]}, 7),
        ({"sep": ":"}, 4),
        ({"global_keyprefix": "app1:"}, 3),
    ],
    ids=repr,
)
def test_the_redis_list_is_the_one_kombus_transport_pushes_onto(options: dict[str, Any], priority: Any) -> None:
    channel = KombuRedisChannel.__new__(KombuRedisChannel)  # only its key arithmetic, no connection
    channel.priority_steps = options.get("priority_steps", KombuRedisChannel.priority_steps)
    channel.sep = options.get("sep", KombuRedisChannel.sep)
    level = channel._get_message_priority({"properties": {"priority": priority}})
    expected = options.get("global_keyprefix", "") + channel._q_for_pri("q", level)
    assert redis_list_key("q", priority, options) == expected


def test_only_kombu_can_deliver_a_route_through_an_exchange_that_fans_out() -> None:
    router = EventRouter(_app(CONFIGS["task_queues-topic"]), redis=True)
    assert router.resolve("events.signup").redis_key is None
    plain = EventRouter(_app({}), redis=True).resolve("events.signup")
    assert (plain.exchange, plain.routing_key, plain.redis_key) == ("", "celery", "celery")


def test_a_queue_whose_list_expires_goes_through_kombu() -> None:
    queues = [Queue("short", Exchange("short"), "short", queue_arguments={"x-expires": 60_000})]
    app = _app({"task_queues": queues, "task_default_queue": "short"})
    assert EventRouter(app, redis=True).resolve("events.signup").redis_key is None


def test_default_queue_and_a_different_task_default_queue_are_refused_at_start_up() -> None:
    with pytest.raises(ValueError, match=r"default_queue='a'.*task_default_queue.*'b'"):
        CeleryEventsConfig(default_queue="a", celery_config={"task_default_queue": "b"})
    CeleryEventsConfig(default_queue="a", celery_config={"task_default_queue": "a"})


def test_default_queue_and_a_brought_apps_different_task_default_queue_are_refused() -> None:
    brought = _app({"task_default_queue": "b"})
    with pytest.raises(ValueError, match=r"default_queue='a'.*task_default_queue='b'"):
        build_celery_app(CeleryEventsConfig(celery_app=brought, default_queue="a"))


def test_default_queue_is_celerys_task_default_queue_so_routes_still_apply() -> None:
    app = build_celery_app(
        CeleryEventsConfig(
            broker_url="memory://", default_queue="work", celery_config={"task_routes": {"events.x": "x"}}
        )
    )
    router = EventRouter(app)
    assert router.resolve("events.x").routing_key == "x"
    assert router.resolve("events.y").routing_key == "work"


def picky_router(name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **_: Any) -> dict[str, Any]:
    if kwargs.get("n") == 13:
        raise LookupError("no queue for 13")
    return {"queue": "routed"}


def test_a_route_celery_cannot_resolve_raises_at_emit_naming_the_event_and_the_fix() -> None:
    from litestar import Litestar

    from litestar_celery_events import CeleryEventsPlugin, listener

    @listener("signup")
    def welcome(n: int) -> None: ...

    config = CeleryEventsConfig(
        broker_url="redis://127.0.0.1:1/0",
        celery_config={"task_routes": {"events.*": "nowhere"}, "task_create_missing_queues": False},
    )
    emitter = Litestar(listeners=[welcome], plugins=[CeleryEventsPlugin(config)]).event_emitter
    emitter.start()  # type: ignore[attr-defined]
    try:
        with pytest.raises(ImproperlyConfiguredException, match=r"cannot emit event 'signup'.*'nowhere'.*task_queues"):
            emitter.emit("signup", n=1)
    finally:
        emitter.stop()  # type: ignore[attr-defined]


def test_a_message_a_router_function_refuses_is_refused_and_the_others_are_published() -> None:
    from litestar_celery_events.transports import MessageRefused
    from litestar_celery_events.transports.kombu import KombuTransport

    app = _app({"task_routes": f"{__name__}.picky_router"})
    transport = KombuTransport(app)
    batch = [Emission.create("e", "events.e", (), {"n": n}, max_payload_bytes=1000) for n in (12, 13, 14)]
    done = [0]
    with pytest.raises(MessageRefused, match="no queue for 13"):
        transport.publish(batch, done)
    assert done == [1]
    transport.close()
