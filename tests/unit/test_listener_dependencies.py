"""Listener dependencies, the app's lifespan for listeners, and the one listener loop per process."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from litestar import Litestar, Request
from litestar.config.app import AppConfig
from litestar.datastructures import State
from litestar.di import Provide
from litestar.exceptions import ImproperlyConfiguredException
from litestar.params import Dependency
from litestar.plugins import InitPluginProtocol

from litestar_celery_events import CeleryEventsConfig, CeleryEventsPlugin, ListenerSignatureError, listener
from litestar_celery_events.runtime.app import create_worker_app
from litestar_celery_events.runtime.event_loop import process_loop, run_coroutine
from litestar_celery_events.testing import fake_events, inline_events
from tests.helpers import HAS_NAMED_DEPENDENCY, NamedDependency


@dataclass
class Settings:
    currency: str


@dataclass
class Order:
    id: int
    amount: float


def provide_settings() -> Settings:
    return Settings("EUR")


def _app(*listeners: Any, dependencies: dict[str, Any] | None = None, **config: Any) -> Litestar:
    return Litestar(
        listeners=list(listeners),
        dependencies=dependencies or {},
        plugins=[CeleryEventsPlugin(CeleryEventsConfig(**config))],
    )


def test_emit_checks_the_emitted_parameters_and_skips_the_injected_ones() -> None:
    @listener("order_placed")
    async def on_order(order: Order, settings: Settings, state: State, app: Litestar) -> None:
        return None

    app = _app(on_order, dependencies={"settings": Provide(provide_settings, sync_to_thread=False)})
    with fake_events(app) as events:
        app.emit("order_placed", order=Order(1, 9.5))
        app.emit("order_placed", Order(2, 1.0))
        with pytest.raises(ListenerSignatureError, match=r"missing required argument\(s\) \['order'\]"):
            app.emit("order_placed")
        with pytest.raises(ListenerSignatureError, match="unexpected keyword argument"):
            app.emit("order_placed", order=Order(3, 1.0), settings=Settings("USD"))
        with pytest.raises(ListenerSignatureError, match="at most 1 positional"):
            app.emit("order_placed", Order(4, 1.0), Settings("USD"))
    assert events.emitted[0].kwargs == {"order": {"id": 1, "amount": 9.5}}  # the typed payload, not the dependency


class ProvidesSettings(InitPluginProtocol):
    """Adds a dependency in place, as advanced-alchemy's plugin adds ``db_session``."""

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        app_config.dependencies.update({"settings": Provide(provide_settings, sync_to_thread=False)})
        return app_config


def test_a_dependency_a_later_plugin_adds_to_an_app_without_dependencies_is_injected() -> None:
    @listener("order_placed")
    async def on_order(order_id: int, settings: Settings) -> None:
        return None

    app = Litestar(listeners=[on_order], plugins=[CeleryEventsPlugin(CeleryEventsConfig()), ProvidesSettings()])
    with fake_events(app) as events:
        app.emit("order_placed", order_id=1)  # settings is injected, not emitted
        with pytest.raises(ListenerSignatureError, match="unexpected keyword argument"):
            app.emit("order_placed", order_id=2, settings=Settings("USD"))
    events.assert_emitted("order_placed", order_id=1)


def test_a_parameter_named_state_that_is_not_litestars_state_is_emitted() -> None:
    @listener("status_changed")
    def on_status(state: str) -> None:
        return None

    app = _app(on_status)
    with fake_events(app) as events:
        app.emit("status_changed", state="shipped")
        with pytest.raises(ListenerSignatureError, match="missing"):
            app.emit("status_changed")
    events.assert_emitted("status_changed", state="shipped")


def _unprovided_listener() -> Any:
    """A listener with a parameter marked as a dependency, as the installed Litestar marks one."""
    if HAS_NAMED_DEPENDENCY:  # Litestar 2.23+, where Dependency() is deprecated

        @listener("report_due")
        async def build_report(day: str, db_session: NamedDependency[Any]) -> None:
            return None

        return build_report

    @listener("report_due")
    async def build_report(day: str, db_session: Any = Dependency()) -> None:  # noqa: B008 - how Litestar marks one
        return None

    return build_report


def test_a_dependency_no_layer_provides_fails_at_emit_and_at_worker_start_naming_listener_and_parameter() -> None:
    build_report = _unprovided_listener()
    app = _app(build_report)
    message = r"listener .*build_report asks for dependency 'db_session', which no layer provides"
    with fake_events(app), pytest.raises(ListenerSignatureError, match=message):
        app.emit("report_due", day="monday")
    with pytest.raises(ImproperlyConfiguredException, match=message):
        create_worker_app(app)


def test_a_dependency_that_needs_the_request_fails_at_worker_start() -> None:
    def provide_user(request: Request[Any, Any, Any]) -> str:
        return "someone"

    @listener("user_seen")
    def on_seen(n: int, user: str) -> None:
        return None

    app = _app(on_seen, dependencies={"user": Provide(provide_user, sync_to_thread=False)})
    with pytest.raises(ImproperlyConfiguredException, match=r"dependency 'user' needs 'request', which only a request"):
        create_worker_app(app)


def test_inline_events_injects_sync_async_and_generator_dependencies_with_cleanup_after_each_call() -> None:
    log: list[str] = []

    async def provide_rate(settings: Settings) -> float:
        return 0.2 if settings.currency == "EUR" else 0.0

    def provide_connection(state: State) -> Iterator[str]:
        log.append(f"open {state.dsn}")
        yield "connection"
        log.append("close")

    async def provide_audit() -> AsyncIterator[list[str]]:
        entries: list[str] = []
        yield entries
        log.append(f"audit {entries}")

    @listener("order_placed", dependencies={"audit": Provide(provide_audit)})
    async def save(order: Order, rate: float, conn: str, audit: list[str]) -> None:
        audit.append(f"{conn}: {order.id} at {order.amount * (1 + rate):.2f}")
        log.append("listener")

    @listener("order_placed")
    def count(order: Order, app: Litestar, settings: Settings) -> None:
        log.append(f"count {order.id} {settings.currency} {type(app).__name__}")

    def set_dsn(app: Litestar) -> None:
        app.state.dsn = "db://orders"

    app = Litestar(
        listeners=[save, count],
        on_startup=[set_dsn],
        dependencies={
            "settings": Provide(provide_settings, sync_to_thread=False),
            "rate": Provide(provide_rate),
            "conn": Provide(provide_connection),
        },
        plugins=[CeleryEventsPlugin()],
    )
    with inline_events(app):
        app.emit("order_placed", order=Order(7, 10.0))
    # Generator cleanups run after the listener (together, as Litestar runs them), before the next listener.
    assert log[:2] == ["open db://orders", "listener"]
    assert set(log[2:4]) == {"close", "audit ['connection: 7 at 12.00']"}
    assert log[4:] == ["count 7 EUR Litestar"]


def test_inline_events_runs_the_apps_lifespan_and_the_workers_own_hooks_and_honours_the_opt_out() -> None:
    seen: list[str] = []

    @listener("ping")
    async def on_ping(state: State) -> None:
        seen.append(f"ping {state.get('client')} {asyncio.get_running_loop() is process_loop()}")

    def startup(app: Litestar) -> None:
        app.state.client = "client"
        seen.append("startup")

    config = {
        "worker_on_startup": [lambda: seen.append("worker startup")],
        "worker_on_shutdown": [lambda: seen.append("worker shutdown")],
    }
    for worker_lifespan in (True, False):
        seen.clear()
        app = Litestar(
            listeners=[on_ping],
            on_startup=[startup],
            on_shutdown=[lambda: seen.append("shutdown")],
            plugins=[CeleryEventsPlugin(CeleryEventsConfig(worker_lifespan=worker_lifespan, **config))],
        )
        with inline_events(app):
            app.emit("ping")
        if worker_lifespan:
            assert seen == ["startup", "worker startup", "ping client True", "worker shutdown", "shutdown"]
        else:
            assert seen == ["worker startup", "ping None True", "worker shutdown"]


def test_every_thread_submits_to_the_one_loop_of_the_process() -> None:
    async def current() -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    loops: list[asyncio.AbstractEventLoop] = []
    threads = [threading.Thread(target=lambda: loops.append(run_coroutine(current()))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(loops) == 4 and all(loop is process_loop() for loop in loops)

    async def nested() -> None:
        run_coroutine(current())

    with pytest.raises(RuntimeError, match="called from the listener loop itself"):
        run_coroutine(nested())


def test_a_coroutine_that_outlives_its_timeout_is_cancelled_on_the_loop() -> None:
    cancelled = threading.Event()

    async def slow() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with pytest.raises(TimeoutError):
        run_coroutine(slow(), timeout_s=0.05)
    assert cancelled.wait(2)


@pytest.mark.parametrize("client_first", [True, False], ids=["test client first", "inline events first"])
def test_inline_listeners_and_a_test_client_each_get_the_resources_of_their_own_loop(client_first: bool) -> None:
    from contextlib import ExitStack, asynccontextmanager

    from litestar import get
    from litestar.testing import TestClient

    @asynccontextmanager
    async def pool_lifespan(app: Litestar) -> AsyncIterator[None]:
        app.state.pool_loop = asyncio.get_running_loop()  # stands for an asyncpg pool
        yield

    checks: list[bool] = []

    @listener("ping")
    async def on_ping(state: State) -> None:
        checks.append(state.pool_loop is asyncio.get_running_loop())

    @get("/ping")
    async def ping(request: Request[Any, Any, Any]) -> None:
        checks.append(request.app.state.pool_loop is asyncio.get_running_loop())
        request.app.emit("ping")

    app = Litestar(route_handlers=[ping], listeners=[on_ping], lifespan=[pool_lifespan], plugins=[CeleryEventsPlugin()])
    with ExitStack() as stack:
        if client_first:
            client = stack.enter_context(TestClient(app))
            stack.enter_context(inline_events(app))
        else:
            stack.enter_context(inline_events(app))
            client = stack.enter_context(TestClient(app))
        assert client.get("/ping").status_code == 200
    assert checks == [True, True]


def test_a_shutdown_that_hangs_is_abandoned_after_the_timeout_and_one_that_raises_is_logged() -> None:
    import logging
    import time

    from litestar_celery_events.emitter import emitter_of
    from litestar_celery_events.runtime.lifespan import WorkerLifespan

    async def hang() -> None:
        await asyncio.sleep(30)

    def fail() -> None:
        raise RuntimeError("could not flush the metrics client")

    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(f"{record.getMessage()} {record.exc_info!r}")

    handler = Collect()
    for name in ("litestar_celery_events.worker", "asyncio"):
        logging.getLogger(name).addHandler(handler)
    try:
        for hook, expected in ((hang, "did not finish within 0.2s"), (fail, "could not flush the metrics client")):
            messages.clear()
            app = _app(worker_on_shutdown=[hook], worker_shutdown_timeout_s=0.2)
            lifespan = WorkerLifespan(app, emitter_of(app))
            lifespan.start()
            started = time.monotonic()
            lifespan.stop()  # never raises
            assert time.monotonic() - started < 5
            assert any(expected in message for message in messages), messages
            assert not any("asynchronous generator" in message for message in messages), messages
    finally:
        for name in ("litestar_celery_events.worker", "asyncio"):
            logging.getLogger(name).removeHandler(handler)
