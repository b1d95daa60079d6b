"""Tracing and logs: one OpenTelemetry trace from the emitting request to the listeners in the worker.

When ``opentelemetry`` is installed and a span is current at ``emit`` (a traced request), the
emitter opens a short ``emit <event>`` producer span and sends its context in the message headers
(W3C ``traceparent``). The worker continues that trace: a ``process <event>`` consumer span per
task and a ``listener <name>`` span per listener call, retries included. Without opentelemetry,
or without a current span, ``emit`` does no tracing work at all.

The worker's half (the consumer spans, listener spans and the log context) is
``runtime.observability``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from litestar_celery_events.contract.message import Emission

__all__ = ("TRACER_NAME", "TRACE_HEADERS", "emission_tracer", "otel_modules")

TRACE_HEADERS = ("traceparent", "tracestate")
TRACER_NAME = "litestar_celery_events"


def otel_modules() -> tuple[Any, Any, Any] | None:
    """``(trace, propagate, context)`` when opentelemetry-api is installed, else ``None``."""
    try:
        from opentelemetry import context, propagate, trace
    except ImportError:
        return None
    return trace, propagate, context


def emission_tracer() -> Callable[[Emission], None] | None:
    """The emitter's hook: ``None`` without opentelemetry (``emit`` then skips tracing entirely)."""
    otel = otel_modules()
    if otel is None:
        return None
    trace, propagate, context = otel
    tracer = trace.get_tracer(TRACER_NAME)
    producer = trace.SpanKind.PRODUCER
    current_context = context.get_current

    def trace_emission(emission: Emission) -> None:
        # An untraced request has an empty context: one lookup instead of finding no span in it.
        if not current_context() or not trace.get_current_span().get_span_context().is_valid:
            return  # no trace in progress: nothing to continue
        attributes = {
            "messaging.system": "celery",
            "messaging.operation.type": "send",
            "messaging.destination.name": emission.task_name,
            "messaging.message.id": emission.emission_id,
            "litestar_celery_events.event_id": emission.event_id,
        }
        with tracer.start_as_current_span(f"emit {emission.event_id}", kind=producer, attributes=attributes):
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
        emission.extra_headers = {**(emission.extra_headers or {}), **carrier}

    return trace_emission
