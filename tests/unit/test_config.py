from __future__ import annotations

from pathlib import Path

import pytest
from celery import Celery

from litestar_celery_events import CeleryEventsConfig
from litestar_celery_events.brokers import redact_url
from litestar_celery_events.celery_app import build_celery_app


def test_broker_url_argument_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://env:6379/0")
    assert CeleryEventsConfig(broker_url="amqp://arg//").resolved_broker_url == "amqp://arg//"


def test_broker_url_falls_back_to_the_environment_then_the_embedded_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://env:6379/0")
    assert CeleryEventsConfig().resolved_broker_url == "redis://env:6379/0"
    monkeypatch.delenv("CELERY_BROKER_URL")
    assert CeleryEventsConfig().resolved_broker_url == "filesystem://"


def test_embedded_broker_lives_in_the_data_dir_shared_by_app_and_worker(tmp_path: Path) -> None:
    app = build_celery_app(CeleryEventsConfig(data_dir=str(tmp_path)))
    options = app.conf.broker_transport_options
    assert options["data_folder_in"] == options["data_folder_out"] == str(tmp_path / "broker")
    assert (tmp_path / "broker").is_dir()
    assert app.conf.worker_enable_remote_control is False


def test_celery_config_is_passed_through_unchanged() -> None:
    settings = {"broker_transport_options": {"visibility_timeout": 3600}, "task_default_queue": "events"}
    app = build_celery_app(CeleryEventsConfig(broker_url="redis://x:1/0", celery_config=settings))
    assert app.conf.broker_transport_options == {"visibility_timeout": 3600}
    assert app.conf.task_default_queue == "events"


def test_apps_accept_json_only_even_when_brought_by_the_user() -> None:
    own = Celery("mine", broker="redis://x:1/0", set_as_current=False)
    own.conf.accept_content = ["json", "pickle"]
    app = build_celery_app(CeleryEventsConfig(celery_app=own))
    assert app is own
    assert app.conf.accept_content == ["json"]
    assert app.conf.broker_url == "redis://x:1/0"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("amqp://guest:s3cret@host:5672//", "amqp://guest:***@host:5672//"),
        ("redis://:pw@localhost:6379/0", "redis://:***@localhost:6379/0"),
        ("error connecting to redis://user:p@ss@h:1/0 now", "error connecting to redis://user:***@h:1/0 now"),
        ("redis://localhost:6379/0", "redis://localhost:6379/0"),
    ],
)
def test_redact_url_hides_passwords(text: str, expected: str) -> None:
    assert redact_url(text) == expected


@pytest.mark.parametrize(
    "kwargs",
    [{"task_name_prefix": ""}, {"task_name_prefix": "a b"}, {"max_buffered_events": 0}, {"flush_timeout_s": -1}],
)
def test_invalid_settings_fail_at_construction(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        CeleryEventsConfig(**kwargs)  # type: ignore[arg-type]
