"""A traced Litestar app: Litestar's OpenTelemetry plugin on the web side, a span file in the worker.

The worker's child processes export every finished span as one JSON line to env SPAN_FILE, so the
test can put the web process's spans (in memory) and the worker's spans into one trace.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from celery import signals
from litestar import Litestar, Request, post
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from litestar_celery_events import CeleryEventsConfig, CeleryEventsPlugin, RetryPolicy, listener

try:
    from litestar.plugins.opentelemetry import OpenTelemetryConfig, OpenTelemetryPlugin
except ImportError:  # Litestar 2.12 (the lowest supported) has it under contrib only
    from litestar.contrib.opentelemetry import OpenTelemetryConfig, OpenTelemetryPlugin

logger = logging.getLogger("tests.apps.traced")


def _attempts_file() -> Path:
    return Path(os.environ["SPAN_FILE"]).with_suffix(".attempts")


@listener("order_paid")
async def send_receipt(order_id: int) -> None:
    logger.info("sending the receipt of order %s", order_id)


@listener("order_paid", max_retries=2, retry_backoff=False, default_retry_delay=0.1)
def book_payment(order_id: int) -> None:
    with open(_attempts_file(), "a", encoding="utf-8") as attempts:
        attempts.write("x")
    if len(_attempts_file().read_text()) < 2:
        raise ConnectionError("ledger unavailable")
    logger.info("booked order %s", order_id)


@post("/orders/{order_id:int}/pay", status_code=202)
async def pay(order_id: int, request: Request[Any, Any, Any]) -> None:
    request.app.emit("order_paid", order_id=order_id)


def create_app() -> Litestar:
    return Litestar(
        route_handlers=[pay],
        listeners=[send_receipt, book_payment],
        plugins=[
            OpenTelemetryPlugin(OpenTelemetryConfig()),
            CeleryEventsPlugin(
                CeleryEventsConfig(
                    default_queue=os.environ.get("TEST_QUEUE"),
                    default_retry=RetryPolicy(max_retries=0),
                    # env ASYNC_CONCURRENCY: the same trace through the asyncio pool
                    async_concurrency=int(os.environ["ASYNC_CONCURRENCY"])
                    if os.environ.get("ASYNC_CONCURRENCY")
                    else None,
                )
            ),
        ],
    )


class JsonLinesSpanExporter(SpanExporter):
    """Appends each span (ids, parent, name, kind, attributes) as one JSON line."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with open(self.path, "a", encoding="utf-8") as out:
            for span in spans:
                context = span.get_span_context()
                assert context is not None
                line = {
                    "name": span.name,
                    "kind": span.kind.name,
                    "trace_id": f"{context.trace_id:032x}",
                    "span_id": f"{context.span_id:016x}",
                    "parent_id": f"{span.parent.span_id:016x}" if span.parent else None,
                    "status": span.status.status_code.name,
                    "attributes": dict(span.attributes or {}),
                    "pid": os.getpid(),
                }
                out.write(json.dumps(line) + "\n")
        return SpanExportResult.SUCCESS


@signals.worker_process_init.connect(weak=False)
def _trace_to_span_file(**_: object) -> None:
    """In each worker child (never in the test process): export spans to SPAN_FILE."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(Path(os.environ["SPAN_FILE"]))))
    trace.set_tracer_provider(provider)
