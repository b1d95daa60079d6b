"""``litestar_celery_events.testing``: fake (record only) and inline (run listeners here) modes, no broker.

The broker URL points at a closed port: anything that tried to publish would fail these tests.
"""

from __future__ import annotations

import datetime
import os
import re
from pathlib import Path

import pytest
from litestar import Litestar
from litestar.exceptions import ImproperlyConfiguredException
from litestar.testing import TestClient

from litestar_celery_events import (
    CeleryEventsConfig,
    CeleryEventsPlugin,
    EventPayloadError,
    ListenerSignatureError,
    emit_later,
    listener,
)
from litestar_celery_events.testing import ListenerFailedError, fake_events, inline_events
from tests.apps import recording, typed
from tests.helpers import ROOT, needs_advanced_alchemy, read_records, runs_of


@pytest.fixture(autouse=True)
def _env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://127.0.0.1:1/0")  # nothing listens there
    monkeypatch.setenv("CELERY_EVENTS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("RECORD_FILE", str(tmp_path / "records.jsonl"))


@pytest.fixture
def app() -> Litestar:
    return recording.create_app()


def test_fake_events_records_what_a_request_emitted_and_runs_no_listener(app: Litestar, tmp_path: Path) -> None:
    with fake_events(app) as events, TestClient(app) as client:
        assert client.post("/users", json={"email": "ada@example.com"}).status_code == 201
        assert client.delete("/users/bob@example.com").status_code == 204

    events.assert_emitted("user_created")
    events.assert_emitted("user_created", email="ada@example.com")
    events.assert_emitted("user_deleted", email="bob@example.com", reason="deleted")
    events.assert_emitted_times("user_created", 1)
    events.assert_not_emitted("order_placed")
    assert [e.event_id for e in events.emitted] == ["user_created", "user_deleted"]
    assert not read_records(tmp_path / "records.jsonl"), "no listener ran"


def test_a_failed_assertion_lists_what_was_emitted(app: Litestar) -> None:
    with fake_events(app) as events:
        app.emit("user_created", email="ada@example.com")  # no lifespan needed
    with pytest.raises(AssertionError, match=re.escape("user_created(args=(), kwargs={'email': 'ada@example.com'})")):
        events.assert_emitted("user_created", email="grace@example.com")
    with pytest.raises(AssertionError, match="expected no events"):
        events.assert_nothing_emitted()
    with pytest.raises(AssertionError, match="emitted 1 time"):
        events.assert_emitted_times("user_created", 2)


def test_fake_events_keeps_every_check_emit_makes_in_production(app: Litestar) -> None:
    with fake_events(app) as events:
        with pytest.raises(ImproperlyConfiguredException):
            app.emit("no_such_event")
        with pytest.raises(ListenerSignatureError):
            app.emit("order_placed", order_number=1)
        with pytest.raises(EventPayloadError):
            app.emit("order_placed", order_id=object())
    events.assert_nothing_emitted()


def test_fake_events_matches_typed_payloads_by_value() -> None:
    app = typed.create_app()
    when = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    with fake_events(app) as events:
        app.emit("user_signed_up", user=typed.User("ada@example.com", when))
    events.assert_emitted("user_signed_up", user=typed.User("ada@example.com", when))
    events.assert_emitted("user_signed_up", user={"email": "ada@example.com", "signed_up_at": "2026-01-01T00:00:00Z"})


def test_fake_events_records_the_due_time_of_a_delayed_event(app: Litestar) -> None:
    with fake_events(app) as events:
        emit_later(app, "user_created", delay=3600, email="later@example.com")
    (event,) = events.of("user_created")
    assert event.eta is not None


def test_inline_events_runs_the_listeners_in_this_process_before_the_response(app: Litestar, tmp_path: Path) -> None:
    records = tmp_path / "records.jsonl"
    with inline_events(app) as events, TestClient(app) as client:
        client.post("/users", json={"email": "ada@example.com"})
        assert {r["listener"] for r in read_records(records)} == {"send_welcome_email_handler", "send_email_handler"}
    assert all(r["pid"] == os.getpid() for r in read_records(records))
    events.assert_emitted("user_created", email="ada@example.com")
    events.assert_ran("send_welcome_email_handler", times=1)  # async, run while the app's loop is busy
    events.assert_ran("tests.apps.recording.send_email_handler")


def test_inline_events_retries_a_flaky_listener_without_rerunning_its_siblings(app: Litestar, tmp_path: Path) -> None:
    records = tmp_path / "records.jsonl"
    with inline_events(app) as events:
        app.emit("order_placed", order_id=7)
    assert len(runs_of(records, "flaky_listener:attempt")) == 3
    assert [r.attempt for r in events.ran("flaky_listener")] == [1, 2, 3]
    assert len(runs_of(records, "steady_listener")) == 1
    assert len(runs_of(records, "routed_listener")) == 1
    assert events.failures == []


def test_inline_events_raises_when_a_listener_fails_for_good(app: Litestar) -> None:
    failed_for_good = re.escape("always_fails on always_fails: builtins.RuntimeError: boom 1")
    with pytest.raises(ListenerFailedError, match=failed_for_good), inline_events(app):
        app.emit("always_fails", n=1)

    with inline_events(app, raise_on_failure=False) as events:
        app.emit("always_fails", n=2)
    (failure,) = events.failures
    assert failure.attempts == 2  # 1 + max_retries
    assert failure.kwargs == {"n": 2}


def test_inline_events_hands_typed_listeners_their_types(tmp_path: Path) -> None:
    app = typed.create_app()
    with inline_events(app):
        app.emit("invoice_sent", invoice=typed.Invoice(number="A-1", total_cents=100))
    (run,) = read_records(tmp_path / "records.jsonl")
    assert run["type"] == "Invoice"


def _readme_example() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Testing your app", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@needs_advanced_alchemy  # the example tests the demo app, whose users live in a database
def test_the_readme_example_runs_as_written() -> None:
    namespace: dict[str, object] = {}
    exec(compile(_readme_example(), "README.md", "exec"), namespace)
    tests = [fn for name, fn in namespace.items() if name.startswith("test_") and callable(fn)]
    assert len(tests) >= 2
    for test in tests:
        test()


def test_inline_events_runs_the_listeners_of_an_event_a_listener_emits() -> None:
    shipped: list[int] = []

    @listener("order_paid")
    async def relay(order_id: int) -> None:
        chained.emit("order_ready_to_ship", order_id=order_id)

    @listener("order_ready_to_ship")
    def ship(order_id: int) -> None:
        shipped.append(order_id)

    chained = Litestar(listeners=[relay, ship], plugins=[CeleryEventsPlugin(CeleryEventsConfig())])
    with inline_events(chained) as events, TestClient(chained):
        chained.emit("order_paid", order_id=42)
        assert shipped == [42]  # before emit returned
    assert [e.event_id for e in events.emitted] == ["order_paid", "order_ready_to_ship"]
    events.assert_ran("relay")
    events.assert_ran("ship")
