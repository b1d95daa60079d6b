from __future__ import annotations

import asyncio

import pytest

from litestar_celery_events import load_litestar_app
from litestar_celery_events.runtime.event_loop import run_coroutine
from litestar_celery_events.runtime.tasks import first_retry_countdown
from tests.helpers import needs_advanced_alchemy


def test_async_listeners_share_one_long_lived_loop_per_process() -> None:
    async def current() -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    first = run_coroutine(current())
    second = run_coroutine(current())
    assert first is second
    assert not first.is_closed()


def test_first_retry_delay_follows_celerys_autoretry_rules() -> None:
    assert first_retry_countdown({"retry_backoff": False, "default_retry_delay": 2.5}) == 2.5
    assert first_retry_countdown({"retry_backoff": True, "retry_jitter": False, "retry_backoff_max": 600}) == 1
    assert first_retry_countdown({"retry_backoff": 4, "retry_jitter": False, "retry_backoff_max": 600}) == 4
    assert 0 <= first_retry_countdown({"retry_backoff": 4, "retry_jitter": True}) <= 4


@pytest.mark.parametrize(
    ("path", "error"),
    [("no_colon", ValueError), ("tests.unit.test_runtime:pytest", TypeError), ("nope.missing:app", ImportError)],
)
def test_loading_the_litestar_app_fails_clearly(path: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        load_litestar_app(path)


def test_no_app_and_no_env_is_a_clear_error_not_a_demo_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LITESTAR_APP", raising=False)
    with pytest.raises(ValueError, match="set LITESTAR_APP=myapp:app"):
        load_litestar_app()


@needs_advanced_alchemy  # the demo app keeps its users in a database
def test_the_app_named_by_litestar_app_is_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LITESTAR_APP", "demo.app:app")
    assert "/users" in {route.path for route in load_litestar_app().routes}
