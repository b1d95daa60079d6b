from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from litestar import Litestar
from litestar.events import listener as litestar_listener

from litestar_celery_events import (
    CeleryEventEmitter,
    CeleryEventsConfig,
    CeleryEventsPlugin,
    EmitterNotRunningError,
    create_worker_app,
    listener,
)


@litestar_listener("user_created")
async def welcome(email: str) -> None: ...


@listener("user_deleted", max_retries=5, queue="mail")
def farewell(email: str, **kwargs: Any) -> None: ...


def _app(tmp_path: Path, **config: Any) -> Litestar:
    return Litestar(
        listeners=[welcome, farewell],
        plugins=[CeleryEventsPlugin(CeleryEventsConfig(data_dir=str(tmp_path), **config))],
    )


def test_the_plugin_installs_a_backend_bound_to_its_config(tmp_path: Path) -> None:
    app = _app(tmp_path, task_name_prefix="myevents")
    assert isinstance(app.event_emitter, CeleryEventEmitter)
    assert app.event_emitter.config.task_name_prefix == "myevents"
    assert set(app.event_emitter.registry.by_event) == {"user_created", "user_deleted"}


def test_emitting_outside_the_lifespan_raises_a_clear_runtime_error(tmp_path: Path) -> None:
    app = _app(tmp_path)
    with pytest.raises(RuntimeError, match="the event emitter is not running") as excinfo:
        app.emit("user_created", email="a")
    assert isinstance(excinfo.value, EmitterNotRunningError)


def test_the_lifespan_starts_and_stops_the_publisher(tmp_path: Path) -> None:
    app = _app(tmp_path)
    emitter = app.event_emitter
    assert isinstance(emitter, CeleryEventEmitter)

    async def run() -> str:
        async with app.lifespan():
            assert emitter.running
            return emitter.enqueue("user_created", email="a@example.com")

    emission_id = asyncio.run(run())
    assert not emitter.running
    assert emission_id
    assert emitter.publisher.pending == 0


def test_the_worker_app_registers_one_task_per_event_and_per_listener(tmp_path: Path) -> None:
    celery_app = create_worker_app(_app(tmp_path))
    names = {name for name in celery_app.tasks if name.startswith("events.")}
    assert names == {
        "events.user_created",
        "events.user_created[tests.unit.test_emitter.welcome]",
        "events.user_deleted",
        "events.user_deleted[tests.unit.test_emitter.farewell]",
    }
    farewell_task = celery_app.tasks["events.user_deleted[tests.unit.test_emitter.farewell]"]
    assert farewell_task.max_retries == 5
    assert farewell_task.queue == "mail"
    assert farewell_task.acks_late is True
    assert farewell_task.reject_on_worker_lost is True


FETCH = "litestar_celery_events.runtime.redis_fetch"


@pytest.mark.parametrize(
    ("broker_url", "transport", "confirm_publish"),
    [
        ("redis://127.0.0.1:1/0", "litestar_celery_events.runtime.redis_fetch:Transport", None),
        (
            "sentinel://127.0.0.1:1;sentinel://127.0.0.1:2",
            "litestar_celery_events.runtime.redis_fetch:SentinelTransport",
            None,
        ),
        ("redis+socket:///tmp/redis.sock", None, None),  # kombu takes the transport from this scheme
        ("amqp://guest:guest@127.0.0.1:1//", None, True),
    ],
    ids=["redis", "sentinel", "unix-socket", "rabbitmq"],
)
def test_the_worker_app_takes_and_sends_messages_the_safe_way_on_each_broker(
    tmp_path: Path, broker_url: str, transport: str | None, confirm_publish: bool | None
) -> None:
    options = {"broker_transport_options": {"master_name": "main"}} if broker_url.startswith("sentinel") else {}
    celery_app = create_worker_app(_app(tmp_path, broker_url=broker_url, celery_config=options))
    assert celery_app.conf.broker_transport == transport
    assert (celery_app.conf.broker_transport_options or {}).get("confirm_publish") == confirm_publish


def test_the_worker_keeps_a_transport_and_confirm_setting_of_its_own(tmp_path: Path) -> None:
    redis_app = create_worker_app(
        _app(tmp_path, broker_url="redis://127.0.0.1:1/0", celery_config={"broker_transport": "redis"})
    )
    assert redis_app.conf.broker_transport == "redis"
    unconfirmed = {"broker_transport_options": {"confirm_publish": False}}
    amqp_app = create_worker_app(_app(tmp_path, broker_url="amqp://127.0.0.1:1//", celery_config=unconfirmed))
    assert amqp_app.conf.broker_transport_options["confirm_publish"] is False


def test_the_worker_refuses_an_app_without_the_plugin() -> None:
    with pytest.raises(TypeError, match="CeleryEventsPlugin"):
        create_worker_app(Litestar(listeners=[welcome]))
