"""The tracing hook at emit and the worker's log context, without a worker."""

from __future__ import annotations

import json
import logging
import sys

import pytest
from opentelemetry.sdk.trace import TracerProvider

from litestar_celery_events.contract.message import Emission, task_headers
from litestar_celery_events.runtime.observability import EventLogContext, JsonLogFormatter, _log_context
from litestar_celery_events.tracing import emission_tracer


def _emission() -> Emission:
    return Emission.create("user_created", "events.user_created", (), {"email": "a@b.c"}, max_payload_bytes=10_000)


def test_emit_adds_no_header_when_no_trace_is_in_progress() -> None:
    trace_emission = emission_tracer()
    assert trace_emission is not None
    emission = _emission()
    trace_emission(emission)
    assert emission.extra_headers is None


def test_emit_inside_a_span_sends_its_trace_as_a_w3c_traceparent_header() -> None:
    trace_emission = emission_tracer()
    assert trace_emission is not None
    tracer = TracerProvider().get_tracer("test")
    emission = _emission()
    with tracer.start_as_current_span("POST /users") as span:
        trace_emission(emission)
    headers = task_headers(emission, "gen1@host")
    version, trace_id, _parent_id, _flags = headers["traceparent"].split("-")
    assert version == "00"
    assert trace_id == f"{span.get_span_context().trace_id:032x}"
    assert headers["event_id"] == "user_created"


def test_without_opentelemetry_emit_has_no_tracing_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    assert emission_tracer() is None


def test_log_records_carry_the_event_emission_and_listener_as_json() -> None:
    record = logging.LogRecord("tests", logging.INFO, __file__, 1, "sent %s", ("mail",), None)
    with _log_context("user_created", "e-1", "app.send_mail"):
        EventLogContext().filter(record)
    line = json.loads(JsonLogFormatter().format(record))
    assert line["message"] == "sent mail"
    assert (line["event_id"], line["emission_id"], line["listener"]) == ("user_created", "e-1", "app.send_mail")

    outside = logging.LogRecord("tests", logging.INFO, __file__, 1, "idle", (), None)
    EventLogContext().filter(outside)
    assert "event_id" not in json.loads(JsonLogFormatter().format(outside))


def test_values_passed_in_extra_win_over_the_context() -> None:
    record = logging.LogRecord("tests", logging.ERROR, __file__, 1, "failed", (), None)
    record.listener = "explicit"
    with _log_context("e", "id", "from-context"):
        EventLogContext().filter(record)
    assert record.listener == "explicit"
