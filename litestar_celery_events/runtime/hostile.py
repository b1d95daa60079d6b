"""Messages the worker will not run: recorded as failures instead of vanishing into a log line.

Celery already refuses them (JSON only; unregistered task names are rejected; a body that cannot
be decoded fails before any task code runs). These handlers turn each refusal into a failed-event
record: an unregistered task or event (``task_unknown``), a message Celery cannot read as a task
(``task_rejected``), and a payload refused or undecodable in the pool child (``task_failure``
with kombu's ``ContentDisallowed`` / ``DecodeError``). A refused payload is never deserialised:
only JSON bodies are read back, with ``json.loads``, to show their arguments in the record.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from celery import bootsteps, signals
from celery.exceptions import NotRegistered
from kombu.exceptions import ContentDisallowed, DecodeError

from litestar_celery_events.contract.message import CONTENT_TYPE, EMITTED_AT_HEADER, EVENT_HEADER
from litestar_celery_events.runtime.failures import ListenerFailure, failure_from_exception, report_failure

if TYPE_CHECKING:
    from celery import Celery

    from litestar_celery_events.config import CeleryEventsConfig

__all__ = ("UNREADABLE_PAYLOAD_ERRORS", "RecordDecodeErrors", "record_refused_messages")

UNREADABLE_PAYLOAD_ERRORS = (ContentDisallowed, DecodeError)
NO_LISTENER = "-"
"""The ``listener`` of a record about a message that names no runnable listener."""


def _json_arguments(message: Any) -> tuple[list[Any], dict[str, Any]]:
    """The args/kwargs of a JSON protocol-v2 body; nothing for any other content type."""
    if getattr(message, "content_type", None) != CONTENT_TYPE:
        return [], {}
    try:
        body = json.loads(message.body)
        args, kwargs = body[0], body[1]
    except Exception:  # noqa: BLE001 - a hostile body is just not shown
        return [], {}
    return (list(args), dict(kwargs)) if isinstance(args, list) and isinstance(kwargs, dict) else ([], {})


def _refused(message: Any, exc: BaseException, task_name: str | None, task_id: str | None) -> ListenerFailure:
    headers = dict(getattr(message, "headers", None) or {})
    args, kwargs = _json_arguments(message)
    return failure_from_exception(
        exc,
        event_id=str(headers.get(EVENT_HEADER) or task_name or headers.get("task") or "?"),
        emission_id=str(task_id or headers.get("root_id") or headers.get("id") or "?"),
        listener=NO_LISTENER if not task_name else f"{NO_LISTENER} (task {task_name})",
        args=args,
        kwargs=kwargs,
        attempts=0,
        permanent=True,
        emitted_at=headers.get(EMITTED_AT_HEADER),
    )


class RecordDecodeErrors(bootsteps.StartStopStep):  # type: ignore[misc]  # celery is untyped
    """A body the consumer cannot decode is acked and logged by Celery, with no signal: record it too."""

    def start(self, parent: Any) -> None:
        original = parent.on_decode_error
        if getattr(original, "records_failures", False):
            return

        def on_decode_error(message: Any, exc: BaseException) -> None:
            original(message, exc)
            task = (getattr(message, "headers", None) or {}).get("task")
            report_failure(_refused(message, exc, str(task) if task else None, None))

        on_decode_error.records_failures = True  # type: ignore[attr-defined]
        parent.on_decode_error = on_decode_error


def record_refused_messages(celery_app: Celery, config: CeleryEventsConfig) -> None:
    """Connect the handlers for ``celery_app``'s worker (idempotent per app)."""
    prefix = f"{config.task_name_prefix}."

    def ours(consumer: Any) -> bool:
        return getattr(consumer, "app", None) is celery_app

    def on_unknown(sender: Any = None, message: Any = None, exc: Any = None, name: Any = None, **extra: Any) -> None:
        if ours(sender):
            error = exc if isinstance(exc, NotRegistered) else NotRegistered(str(name))  # Celery passes a KeyError
            task_id = extra.get("id")
            report_failure(_refused(message, error, str(name) if name else None, str(task_id) if task_id else None))

    def on_rejected(sender: Any = None, message: Any = None, exc: Any = None, **_: Any) -> None:
        if ours(sender):
            error = exc if isinstance(exc, BaseException) else ValueError("message in an unknown format")
            report_failure(_refused(message, error, None, None))

    def on_failure(sender: Any = None, task_id: Any = None, exception: Any = None, **_: Any) -> None:
        name = str(getattr(sender, "name", ""))
        mine = getattr(sender, "app", None) is celery_app and name.startswith(prefix)
        if not mine or not isinstance(exception, UNREADABLE_PAYLOAD_ERRORS):
            return
        failure = _refused(None, exception, name, str(task_id))
        request = getattr(sender, "request", None)  # Celery pushes the message's context
        failure.event_id = str(getattr(request, EVENT_HEADER, None) or name.removeprefix(prefix).split("[")[0])
        failure.emitted_at = getattr(request, EMITTED_AT_HEADER, None)
        report_failure(failure)

    if RecordDecodeErrors not in celery_app.steps["consumer"]:
        celery_app.steps["consumer"].add(RecordDecodeErrors)
    signals.task_unknown.connect(on_unknown, weak=False, dispatch_uid=f"celery-events-unknown-{id(celery_app)}")
    signals.task_rejected.connect(on_rejected, weak=False, dispatch_uid=f"celery-events-rejected-{id(celery_app)}")
    signals.task_failure.connect(on_failure, weak=False, dispatch_uid=f"celery-events-failure-{id(celery_app)}")
