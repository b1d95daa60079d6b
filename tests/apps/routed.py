"""The Litestar app of the broker-fidelity tests: one routing configuration per case, named by env.

``ROUTING_CASE`` names a case of ``CASES``; ``ROUTE_TAG`` makes its queue names unique. The test
process and the worker build the same app from the same env, so they agree on every setting.
Listeners record their runs (``tests.apps.recording.record``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from celery import Celery
from kombu import Exchange, Queue
from litestar import Litestar

from litestar_celery_events import CeleryEventsConfig, CeleryEventsPlugin, PeriodicEvent, RetryPolicy, listener
from tests.apps.recording import record

ROUTED_EVENT = "routed_event"
PRICED_EVENT = "priced_event"


def tag() -> str:
    return os.environ.get("ROUTE_TAG", "local")


def queue(name: str) -> str:
    """A queue name unique to this test run."""
    return f"{name}-{tag()}"


def route_events(name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **kw: Any) -> dict[str, Any] | None:
    """A router function (``task_routes`` given as an import string): it may look at the arguments."""
    if name.startswith("events.") and (kwargs or {}).get("marker") != "elsewhere":
        return {"queue": queue("routed")}
    return None


def _routes_dict() -> dict[str, Any]:
    return {"celery_config": {"task_routes": {"events.*": {"queue": queue("routed")}}}}


def _routes_str() -> dict[str, Any]:
    return {"celery_config": {"task_routes": "tests.apps.routed.route_events"}}


def _routes_list() -> dict[str, Any]:
    return {
        "celery_config": {"task_routes": [{"events.nothing": "nowhere"}, {f"events.{ROUTED_EVENT}": queue("routed")}]}
    }


def _brought_app() -> dict[str, Any]:
    app = Celery("brought", set_as_current=False)
    app.conf.broker_url = os.environ["CELERY_BROKER_URL"]
    app.conf.task_routes = {"events.*": {"queue": queue("routed")}}
    return {"celery_app": app}


def _periodic_routed() -> dict[str, Any]:
    return {**_routes_dict(), "periodic": [PeriodicEvent(ROUTED_EVENT, 1.0, kwargs={"marker": "library"})]}


def _default_queue() -> dict[str, Any]:
    return {"default_queue": queue("default")}


def _task_default_queue() -> dict[str, Any]:
    return {"celery_config": {"task_default_queue": queue("default")}}


def _priority_steps() -> dict[str, Any]:
    return {
        "default_queue": queue("default"),
        "celery_config": {"broker_transport_options": {"priority_steps": [1, 5, 9]}},
    }


def _global_keyprefix() -> dict[str, Any]:
    return {
        "default_queue": queue("default"),
        "celery_config": {"broker_transport_options": {"global_keyprefix": f"app-{tag()}:"}},
    }


def _default_priority() -> dict[str, Any]:
    options = {"queue_arguments": {"x-max-priority": 9}}
    return {
        "celery_config": {
            "task_default_priority": 5,
            "task_queues": [Queue(queue("default"), Exchange(queue("default")), queue("default"), **options)],
            "task_default_queue": queue("default"),
        }
    }


def _listener_options() -> dict[str, Any]:
    return {"default_queue": queue("default"), "celery_config": {"task_queue_max_priority": 9}}


def _topic_two_queues() -> dict[str, Any]:
    exchange = Exchange(queue("topic"), type="topic")
    return {
        "celery_config": {
            "task_queues": [
                Queue(queue("a"), exchange, routing_key="events.#"),
                Queue(queue("b"), exchange, routing_key="events.#"),
            ],
            "task_routes": {"events.*": {"queue": queue("a")}},
        }
    }


CASES: dict[str, Callable[[], dict[str, Any]]] = {
    "task_routes-dict": _routes_dict,
    "task_routes-str": _routes_str,
    "task_routes-list": _routes_list,
    "brought-celery_app": _brought_app,
    "periodic-routed": _periodic_routed,
    "default_queue": _default_queue,
    "task_default_queue": _task_default_queue,
    "priority_steps": _priority_steps,
    "global_keyprefix": _global_keyprefix,
    "task_default_priority": _default_priority,
    "listener-queue-priority": _listener_options,
    "topic-exchange-two-queues": _topic_two_queues,
}


def create_app() -> Litestar:
    case = CASES[os.environ["ROUTING_CASE"]]()

    @listener(ROUTED_EVENT)
    def on_routed(marker: str) -> None:
        record("on_routed", marker=marker)

    @listener(PRICED_EVENT, queue=queue("priced"), priority=7)
    def on_priced(marker: str) -> None:
        record("on_priced", marker=marker)

    return Litestar(
        listeners=[on_routed, on_priced],
        plugins=[
            CeleryEventsPlugin(
                CeleryEventsConfig(
                    default_retry=RetryPolicy(max_retries=0), flush_timeout_s=10, publish_batch_size=50, **case
                )
            )
        ],
    )
