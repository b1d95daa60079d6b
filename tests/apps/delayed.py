"""The app of the RabbitMQ delayed-event tests: listeners that record when they ran and what they saw.

Env: ``TEST_QUEUE`` (the event queue), ``TEST_QUEUE_TYPE`` (``classic`` or ``quorum``),
``DELAY_PREFIX`` and ``DELAY_QUEUE_TYPE`` (the delay levels' names and type), ``RECORD_FILE``,
``QUEUE_ARGUMENTS`` (JSON: arguments of the test's queues, e.g. ``x-consumer-timeout``).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from celery import current_task
from kombu import Exchange, Queue
from litestar import Litestar

from litestar_celery_events import CeleryEventsConfig, CeleryEventsPlugin, RetryPolicy, listener
from tests.apps.recording import attempts_of, record


@listener("reminder_due")
def reminder_listener(note: str) -> None:
    request = current_task.request
    dead_letter_headers = sorted(k for k in vars(request) if k.startswith("x-"))
    record("reminder_listener", note=note, at=time.time(), eta=request.eta, dead_letter_headers=dead_letter_headers)


@listener("payment_due", max_retries=3, retry_backoff=False, default_retry_delay=0.5)
def flaky_payment(n: int) -> None:
    record("flaky_payment:attempt", n=n, at=time.time())
    if attempts_of("flaky_payment:attempt") < 2:
        raise ConnectionError("payment service unavailable")
    record("flaky_payment", n=n)


ETA_QUEUE_SUFFIX = "-eta"


def queues_from_env() -> list[Queue] | None:
    """``TEST_QUEUE`` (and its ``-eta`` sibling) with ``QUEUE_ARGUMENTS`` (JSON), quorum if ``TEST_QUEUE_TYPE`` says."""
    queue = os.environ["TEST_QUEUE"]
    arguments: dict[str, Any] = json.loads(os.environ.get("QUEUE_ARGUMENTS") or "{}")
    names = [queue, queue + ETA_QUEUE_SUFFIX] if arguments else [queue]
    if os.environ.get("TEST_QUEUE_TYPE") == "quorum":
        arguments["x-queue-type"] = "quorum"
    if not arguments:
        return None
    return [Queue(name, Exchange(name), routing_key=name, queue_arguments=arguments) for name in names]


def _celery_config() -> dict[str, Any]:
    settings: dict[str, Any] = {
        "celery_events_delay_prefix": os.environ["DELAY_PREFIX"],
        "broker_native_delayed_delivery_queue_type": os.environ.get("DELAY_QUEUE_TYPE", "quorum"),
    }
    queues = queues_from_env()
    if queues:
        settings["task_queues"] = queues
    return settings


def create_app() -> Litestar:
    return Litestar(
        listeners=[reminder_listener, flaky_payment],
        plugins=[
            CeleryEventsPlugin(
                CeleryEventsConfig(
                    default_queue=os.environ["TEST_QUEUE"],
                    default_retry=RetryPolicy(max_retries=2, default_retry_delay=0.1, retry_backoff=False),
                    celery_config=_celery_config(),
                    flush_timeout_s=10,
                )
            )
        ],
    )
