"""Typed payloads end to end: a web app that declares its events, a real worker that runs typed listeners."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from pathlib import Path

import pytest
from litestar.exceptions import ImproperlyConfiguredException
from litestar.testing import TestClient

from litestar_celery_events import PayloadValidationError
from tests.apps.typed import Invoice, Order, User, create_app, create_web_app
from tests.helpers import celery_worker, read_records, wait_for

pytestmark = pytest.mark.integration


def test_listeners_receive_their_annotated_types_from_a_web_app_that_only_declares_the_events(
    redis_url: str, tmp_path: Path, use_env: Callable[..., dict[str, str]]
) -> None:
    env = use_env(redis_url, "tests.apps.typed:create_app")
    signed_up_at = datetime.datetime(2026, 5, 6, 7, 8, 9, tzinfo=datetime.timezone.utc)

    with celery_worker(env, tmp_path / "worker.log"):
        web = create_web_app()  # imports no listener: declared events only
        with TestClient(web):
            web.emit("user_signed_up", user=User("ada@example.com", signed_up_at), source="api")
            web.emit("invoice_sent", invoice=Invoice(number="INV-1", total_cents=1250))
            with pytest.raises(PayloadValidationError, match="greater than 0"):
                web.emit("invoice_sent", invoice={"number": "INV-2", "total_cents": 0})
            with pytest.raises(ImproperlyConfiguredException):
                web.emit("order_placed", order_id=1)  # neither declared nor listened to here
        app = create_app()
        with TestClient(app):
            app.emit("order_placed", order=Order(7, ["tea", "cake"]), order_id=7, items=["tea", "cake"])

        records = Path(env["RECORD_FILE"])
        wait_for(lambda: len(read_records(records)) >= 4, what="the four typed listeners")
    runs = {run["listener"]: run for run in read_records(records)}

    assert runs["welcome"]["type"] == "User"
    assert runs["welcome"]["fields"] == {"email": "ada@example.com", "signed_up_at": "2026-05-06T07:08:09Z"}
    assert runs["welcome"]["source"] == "api"
    assert runs["welcome"]["aware"] is True  # a datetime again, not a string
    assert runs["archive"]["type"] == "Invoice"
    assert runs["archive"]["fields"] == {"number": "INV-1", "total_cents": 1250}
    assert runs["ship"]["type"] == "Order"
    assert runs["ship"]["fields"] == {"order_id": 7, "items": ["tea", "cake"]}
    assert runs["count_items"]["type"] == "dict"  # the untyped sibling: plain JSON
    assert len(read_records(records)) == 4, "the rejected invoice was never enqueued"
