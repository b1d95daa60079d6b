"""One trace from the request that emitted to the listeners in a real worker; structured worker logs."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.apps.traced import create_app
from tests.helpers import celery_worker, read_records, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def web_spans() -> Iterator[InMemorySpanExporter]:
    """The test process is the web process: its spans go to memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    yield exporter
    exporter.clear()


def _json_lines(text: str) -> list[dict[str, Any]]:
    lines = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
    return lines


@pytest.mark.parametrize("async_concurrency", ["", "10"], ids=["prefork", "asyncio-pool"])
def test_a_request_and_the_listeners_it_triggered_share_one_trace_and_the_worker_logs_carry_the_event(
    web_spans: InMemorySpanExporter,
    redis_url: str,
    tmp_path: Path,
    use_env: Callable[..., dict[str, str]],
    async_concurrency: str,
) -> None:
    web_spans.clear()  # the module's exporter: this run's request only
    span_file = tmp_path / "worker-spans.jsonl"
    env = use_env(
        redis_url,
        "tests.apps.traced:create_app",
        SPAN_FILE=str(span_file),
        CELERY_EVENTS_LOG_FORMAT="json",
        ASYNC_CONCURRENCY=async_concurrency,
    )
    concurrency = ["--concurrency", async_concurrency or "1"]

    with celery_worker(env, tmp_path / "worker.log", extra=concurrency) as worker:
        app = create_app()
        with TestClient(app) as client:
            assert client.post("/orders/42/pay").status_code == 202

        def worker_done() -> list[dict[str, Any]] | None:
            # A span is written when it ends, a listener's before the task span around it: wait for both
            # listeners and for both task spans (the event's and the retry's), or a read can fall between.
            spans = read_records(span_file)
            listener_spans = [s for s in spans if s["name"].startswith("listener ") and s["status"] != "ERROR"]
            task_spans = [s for s in spans if s["kind"] == "CONSUMER"]
            return spans if len(listener_spans) >= 2 and len(task_spans) >= 2 else None

        worker_spans = wait_for(worker_done, timeout=30, what="the worker's spans of both listeners")
        log = worker.output()

    request = next(s for s in web_spans.get_finished_spans() if s.kind is trace.SpanKind.SERVER)
    emit = next(s for s in web_spans.get_finished_spans() if s.name == "emit order_paid")
    trace_id = f"{request.context.trace_id:032x}"

    # One trace: request -> emit (producer) -> process (consumer, in the worker) -> listener spans.
    assert emit.parent is not None and emit.parent.span_id == request.context.span_id
    assert emit.kind is trace.SpanKind.PRODUCER
    assert {s["trace_id"] for s in worker_spans} == {trace_id}
    by_id = {s["span_id"]: s for s in worker_spans}
    event_task = next(
        s
        for s in worker_spans
        if s["name"] == "process order_paid" and "litestar_celery_events.listener" not in s["attributes"]
    )
    assert event_task["parent_id"] == f"{emit.context.span_id:016x}"
    assert event_task["kind"] == "CONSUMER"
    assert event_task["attributes"]["celery.task_name"] == "events.order_paid"
    receipt = next(s for s in worker_spans if s["name"] == "listener tests.apps.traced.send_receipt")
    assert receipt["parent_id"] == event_task["span_id"]

    # The failed first attempt is in the trace too, and so is its retry, as a task of its own.
    failed = next(
        s for s in worker_spans if s["name"] == "listener tests.apps.traced.book_payment" and s["status"] == "ERROR"
    )
    assert failed["parent_id"] == event_task["span_id"]
    book_payment = "tests.apps.traced.book_payment"
    retried = next(
        s
        for s in worker_spans
        if s["kind"] == "CONSUMER" and s["attributes"].get("litestar_celery_events.listener") == book_payment
    )
    assert by_id[retried["parent_id"]] is event_task
    assert retried["attributes"]["celery.task_name"] == f"events.order_paid[{book_payment}]"
    assert retried["attributes"]["celery.retries"] == 1
    succeeded = next(s for s in worker_spans if s["name"] == f"listener {book_payment}" and s["status"] != "ERROR")
    assert succeeded["parent_id"] == retried["span_id"]

    # Structured logs: the listeners' own log lines carry event, emission, listener and trace ids.
    records = _json_lines(log)
    receipt_log = next(r for r in records if r["message"] == "sending the receipt of order 42")
    assert receipt_log["event_id"] == "order_paid"
    assert receipt_log["listener"] == "tests.apps.traced.send_receipt"
    assert receipt_log["trace_id"] == trace_id
    booked = next(r for r in records if r["message"] == "booked order 42")
    assert (
        booked["emission_id"]
        == receipt_log["emission_id"]
        == event_task["attributes"]["litestar_celery_events.emission_id"]
    )
    assert booked["listener"] == "tests.apps.traced.book_payment"
    retry_warning = next(r for r in records if "ledger unavailable" in r["message"])
    assert retry_warning["level"] == "WARNING"
    assert retry_warning["listener"] == "tests.apps.traced.book_payment"
