"""The worker's half of tracing and logs: consumer and listener spans, the log context, JSON lines.

The worker continues the trace the emitter started (``tracing``): a ``process <event>`` consumer
span per task and a ``listener <name>`` span per listener call, retries included. Every log record
a worker writes while it runs an event (ours and the listeners' own) carries ``event_id``,
``emission_id`` and ``listener`` (and ``trace_id``/``span_id`` when traced);
``CELERY_EVENTS_LOG_FORMAT=json`` makes the worker write one JSON object per line.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from celery import signals

from litestar_celery_events.config import LOG_FORMAT_ENV
from litestar_celery_events.contract.message import EVENT_HEADER
from litestar_celery_events.tracing import TRACE_HEADERS, TRACER_NAME, otel_modules

if TYPE_CHECKING:
    from celery import Celery

    from litestar_celery_events.config import CeleryEventsConfig
    from litestar_celery_events.listeners import ListenerSpec

__all__ = ("EventLogContext", "JsonLogFormatter", "ListenerScope", "install_worker_observability")

LOG_FIELDS = ("event_id", "emission_id", "listener")

ListenerScope = Callable[["ListenerSpec"], contextlib.AbstractContextManager[Any]]
"""Wraps each listener call: a ``listener <name>`` span (when traced), the listener in the log context."""

_event_id: ContextVar[str | None] = ContextVar("celery_events_event_id", default=None)
_emission_id: ContextVar[str | None] = ContextVar("celery_events_emission_id", default=None)
_listener: ContextVar[str | None] = ContextVar("celery_events_listener", default=None)


class EventLogContext(logging.Filter):
    """Adds ``event_id``, ``emission_id``, ``listener``, ``trace_id``, ``span_id`` to every record.

    Outside an event they are ``None``; values a log call passes in ``extra`` win.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in (("event_id", _event_id), ("emission_id", _emission_id), ("listener", _listener)):
            if not hasattr(record, name):
                setattr(record, name, var.get())
        if not hasattr(record, "trace_id"):
            record.trace_id, record.span_id = _current_trace_ids()
        return True


@functools.cache
def _otel_for_logs() -> tuple[Any, Any, Any] | None:
    return otel_modules()


def _current_trace_ids() -> tuple[str | None, str | None]:
    otel = _otel_for_logs()  # looked up once: this runs for every log record
    if otel is None:
        return None, None
    span_context = otel[0].get_current_span().get_span_context()
    if not span_context.is_valid:
        return None, None
    return f"{span_context.trace_id:032x}", f"{span_context.span_id:016x}"


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the event fields, trace ids, exception."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "message": record.getMessage(),
        }
        for name in (*LOG_FIELDS, "trace_id", "span_id"):
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


@contextlib.contextmanager
def _log_context(event_id: str | None, emission_id: str | None, listener: str | None) -> Iterator[None]:
    tokens = (_event_id.set(event_id), _emission_id.set(emission_id), _listener.set(listener))
    try:
        yield
    finally:
        _listener.reset(tokens[2])
        _emission_id.reset(tokens[1])
        _event_id.reset(tokens[0])


def install_worker_observability(celery_app: Celery, config: CeleryEventsConfig) -> ListenerScope:
    """In ``celery -A worker ...``: log context on every record, and trace spans when opentelemetry is
    installed. Returns the scope each listener call of ``celery_app`` runs in."""
    json_logs = os.environ.get(LOG_FORMAT_ENV, "").lower() == "json"

    def configure_handlers(logger: logging.Logger | None = None, **_: object) -> None:
        for handler in (logger or logging.getLogger()).handlers:
            if not any(isinstance(f, EventLogContext) for f in handler.filters):
                handler.addFilter(EventLogContext())
            if json_logs:
                handler.setFormatter(JsonLogFormatter())

    signals.after_setup_logger.connect(configure_handlers, weak=False)
    signals.after_setup_task_logger.connect(configure_handlers, weak=False)
    return _install_task_context(celery_app, config)


def _install_task_context(celery_app: Celery, config: CeleryEventsConfig) -> ListenerScope:
    prefix = f"{config.task_name_prefix}."
    otel = otel_modules()
    tracer = otel[0].get_tracer(TRACER_NAME) if otel else None
    active: dict[str, tuple[Any, Any, contextlib.ExitStack]] = {}

    def ours(task: Any) -> bool:
        return task is not None and str(getattr(task, "name", "")).startswith(prefix) and task.app is celery_app

    def prerun(task_id: str, task: Any, **_: object) -> None:
        if not ours(task):
            return
        request = task.request
        event_id = request.get(EVENT_HEADER) or getattr(task, "event_id", None)
        emission_id = str(request.get("root_id") or task_id)
        spec = getattr(task, "spec", None)
        listener = spec.name if spec is not None else None
        stack = contextlib.ExitStack()
        stack.enter_context(_log_context(event_id, emission_id, listener))
        span = token = None
        if otel is not None and tracer is not None and _sdk_configured(otel[0]):
            span, token = _start_task_span(otel, tracer, task, task_id, event_id, emission_id, listener)
        active[task_id] = (span, token, stack)

    def postrun(task_id: str, task: Any, state: str | None = None, **_: object) -> None:
        entry = active.pop(task_id, None)
        if entry is None:
            return
        span, token, stack = entry
        if span is not None and otel is not None:
            span.set_attribute("celery.state", str(state))
            span.end()
            otel[2].detach(token)
        stack.close()

    def failed(task_id: str, exception: BaseException | None = None, **_: object) -> None:
        entry = active.get(task_id)
        if entry is not None and entry[0] is not None and otel is not None and exception is not None:
            entry[0].record_exception(exception)
            entry[0].set_status(otel[0].Status(otel[0].StatusCode.ERROR, str(exception)))

    def before_publish(sender: str | None = None, headers: dict[str, Any] | None = None, **_: object) -> None:
        """A task an event task sends (an escalated or routed listener) continues the trace."""
        if otel is None or headers is None or not str(sender or "").startswith(prefix):
            return
        if otel[0].get_current_span().get_span_context().is_valid:
            otel[1].inject(headers)

    signals.task_prerun.connect(prerun, weak=False)
    signals.task_postrun.connect(postrun, weak=False)
    signals.task_failure.connect(failed, weak=False)
    signals.before_task_publish.connect(before_publish, weak=False)
    return _listener_scope(tracer, otel)


def _sdk_configured(trace: Any) -> bool:
    """False until an SDK tracer provider is set: spans would record nothing, so skip their cost."""
    return not isinstance(trace.get_tracer_provider(), (trace.ProxyTracerProvider, trace.NoOpTracerProvider))


def _start_task_span(
    otel: tuple[Any, Any, Any],
    tracer: Any,
    task: Any,
    task_id: str,
    event_id: str | None,
    emission_id: str,
    listener: str | None,
) -> tuple[Any, Any]:
    """A ``process <event>`` consumer span, child of the context in the message headers; made current."""
    trace, propagate, context = otel
    request = task.request
    parent = propagate.extract({name: request.get(name) for name in TRACE_HEADERS if request.get(name)})
    attributes = {
        "messaging.system": "celery",
        "messaging.operation.type": "process",
        "messaging.message.id": task_id,
        "celery.task_name": task.name,
        "celery.retries": int(request.retries or 0),
        "litestar_celery_events.event_id": event_id or "",
        "litestar_celery_events.emission_id": emission_id,
    }
    if listener:
        attributes["litestar_celery_events.listener"] = listener
    kind = trace.SpanKind.CONSUMER
    span = tracer.start_span(f"process {event_id}", context=parent, kind=kind, attributes=attributes)
    return span, context.attach(trace.set_span_in_context(span, parent))


def _listener_scope(tracer: Any, otel: tuple[Any, Any, Any] | None) -> ListenerScope:
    """Each listener call: a ``listener <name>`` span (when traced) and the listener in the log context."""

    @contextlib.contextmanager
    def scope(spec: ListenerSpec) -> Iterator[None]:
        token = _listener.set(spec.name)
        try:
            if tracer is None or otel is None or not otel[0].get_current_span().get_span_context().is_valid:
                yield
                return
            attributes = {"litestar_celery_events.listener": spec.name, "code.function": spec.name}
            with tracer.start_as_current_span(f"listener {spec.name}", attributes=attributes):
                yield
        finally:
            _listener.reset(token)

    return scope
