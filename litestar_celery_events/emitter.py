"""The publishing side: Litestar's emitter backend that turns each ``emit`` into a Celery task.

``emit`` validates at the call site (listener registered, arguments accepted, payload encodable)
and hands the encoded message to the background publisher: no network I/O on the caller's
thread, so the event loop never waits for the broker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any, ClassVar

import anyio
from litestar.events import BaseEventEmitterBackend

from litestar_celery_events.celery_app import build_celery_app
from litestar_celery_events.config import CeleryEventsConfig
from litestar_celery_events.contract.message import Emission, encode_body, new_emission_id
from litestar_celery_events.errors import EmitterNotRunningError, ListenerSignatureError, PluginNotInstalledError
from litestar_celery_events.listeners import ListenerRegistry
from litestar_celery_events.publisher import Publisher
from litestar_celery_events.tracing import emission_tracer
from litestar_celery_events.transports import transport_for

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from types import TracebackType

    from celery import Celery
    from litestar import Litestar
    from litestar.events import EventListener

    from litestar_celery_events.outbox import TransactionalOutbox
    from litestar_celery_events.transports import Transport

__all__ = ("CeleryEventEmitter", "emitter_of")

logger = logging.getLogger("litestar_celery_events")


class CeleryEventEmitter(BaseEventEmitterBackend):
    """Emitter backend publishing events to Celery. Installed by ``CeleryEventsPlugin``.

    Litestar builds the backend from its class with only ``listeners=``, so the plugin binds the
    config to a subclass (``CeleryEventEmitter.bound_to(config)``).
    """

    config: ClassVar[CeleryEventsConfig] = CeleryEventsConfig()
    app_dependencies: ClassVar[Mapping[str, Any]] = {}
    """The app's ``dependencies``: listener parameters they provide are injected, not emitted."""

    def __init__(self, listeners: Sequence[EventListener]) -> None:
        super().__init__(listeners=listeners)
        self.registry = ListenerRegistry.build(listeners, self.config, self.app_dependencies)
        self.celery_app: Celery = build_celery_app(self.config)
        self.publisher = Publisher(
            self.celery_app, self.config, task_options=self.task_options(), on_refused=self.record_refused
        )
        self._check_route = self.publisher.route.check
        self.publish_from_loop = True
        """False in a worker: its listeners' emits keep going through the publisher thread."""
        self._task_names: dict[str, str] = {}  # an event's task name, built once (events come from the code)
        self._check_signatures = self.config.check_signatures
        self._max_payload_bytes = self.config.max_payload_bytes
        self._plain_events: dict[str, str] = {}
        """Events emitted once already whose emits need no more than the argument shape check: no
        declaration, no typed payload, a route Celery resolved; their task names (``prepare``'s fast path)."""
        self._running = False
        self._trace: Callable[[Emission], None] | None = emission_tracer()  # None without opentelemetry
        # With an outbox, an emission made inside an open transaction waits for its commit.
        self.outbox: TransactionalOutbox | None = None
        if self.config.outbox is not None:
            self.outbox = self.config.outbox.attach(
                self.config, self._publish_committed, self._open_transport, self.record_refused, self._write_committed
            )
            self.publisher.on_published = self.outbox.relay.published

    @classmethod
    def bound_to(
        cls, config: CeleryEventsConfig, app_dependencies: Mapping[str, Any] | None = None
    ) -> type[CeleryEventEmitter]:
        """``app_dependencies`` is read when Litestar builds the backend, after every plugin added its own."""
        # The same dict, even while empty: a plugin after this one (advanced-alchemy) fills it in place.
        dependencies = app_dependencies if app_dependencies is not None else {}
        attributes = {"config": config, "app_dependencies": dependencies, "__module__": cls.__module__}
        return type(cls.__name__, (cls,), attributes)

    @property
    def running(self) -> bool:
        return self._running

    def start(self) -> None:
        """Start the publisher (the app's lifespan does this; the worker does it per process)."""
        self.publisher.start()
        self._running = True

    def stop(self) -> int:
        """Stop accepting events, flush within ``flush_timeout_s``; return how many stayed unpublished."""
        self._running = False
        return self.publisher.stop()

    async def __aenter__(self) -> CeleryEventEmitter:
        self.start()
        if self.config.publish_on_event_loop and self.publish_from_loop:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # not asyncio (trio under anyio): the thread publishes
                return self
            self.publisher.publish_on_loop(loop)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        await anyio.to_thread.run_sync(self.stop)

    def emit(self, event_id: str, *args: Any, **kwargs: Any) -> None:
        """Litestar's ``emit``: enqueue ``event_id`` for its listeners (``app.emit`` calls this)."""
        emission = self.prepare(event_id, args, kwargs)
        outbox = self.outbox  # ``submit`` written out: one call less on every request that emits
        if outbox is None or not outbox.hold(emission):
            self.publisher.submit(emission)

    def enqueue(self, event_id: str, *args: Any, **kwargs: Any) -> str:
        """Like ``emit``, and return the emission id (also the Celery task id)."""
        return self.submit(self.prepare(event_id, args, kwargs))

    def prepare(self, event_id: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Emission:
        """Validate and encode an emission; raises at the call site, enqueues nothing."""
        task_name = self._plain_events.get(event_id)
        if (
            task_name is None
            or not self._running
            or (self._check_signatures and (event_id, len(args), *kwargs) not in self.registry.fitting_shapes)
        ):
            return self._prepare_checked(event_id, args, kwargs)
        # The same checks as below, each already passed by this event (and this argument shape).
        emission = Emission(
            event_id,
            new_emission_id(),
            task_name,
            encode_body(event_id, args, kwargs, self._max_payload_bytes),
            args,
            kwargs,
            None,
            time.time(),
        )
        if self._trace is not None:
            self._trace(emission)
        return emission

    def _prepare_checked(self, event_id: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Emission:
        if not self._running:
            raise EmitterNotRunningError(
                f"cannot emit event {event_id!r}: the event emitter is not running; emit inside the Litestar "
                "app's lifespan (request handlers, on_startup hooks) or use emitter.start()"
            )
        specs = self.registry.get(event_id)
        if self.registry.unresolved and event_id in self.registry.unresolved:
            raise ListenerSignatureError(f"cannot emit event {event_id!r}: {self.registry.unresolved[event_id]}")
        if self.config.check_signatures:
            self.registry.check_arguments(event_id, specs, args, kwargs)
        payloads = self.registry.payloads  # empty unless some listener or declaration has typed parameters
        if payloads and event_id in payloads:
            args, kwargs = payloads[event_id].encode(event_id, args, kwargs)
        task_name = self._task_names.get(event_id)
        if task_name is None:
            task_name = self._task_names[event_id] = self.config.event_task_name(event_id)
        emission = Emission.create(
            event_id,
            task_name,
            args,
            kwargs,
            max_payload_bytes=self.config.max_payload_bytes,
        )
        self._check_route(emission)  # a route Celery cannot resolve raises here, not in the publisher
        if not (payloads and event_id in payloads) and event_id not in self.registry.declared:
            self._plain_events[event_id] = task_name
        if self._trace is not None:
            self._trace(emission)  # adds traceparent when a span is current
        return emission

    def task_options(self) -> dict[str, dict[str, Any]]:
        """The routing options of the tasks the worker registers (a listener's ``queue``, ``priority``)."""
        options: dict[str, dict[str, Any]] = {}
        for event_id, specs in self.registry.by_event.items():
            for spec in specs:
                own = {k: spec.task_options[k] for k in ("queue", "priority") if k in spec.task_options}
                if own:
                    options[self.config.listener_task_name(event_id, spec.name)] = own
        return options

    def _publish_committed(self, emission: Emission) -> None:
        """The outbox hands a committed emission to whichever publisher is current (a test swaps it)."""
        self.publisher.submit(emission)

    def _write_committed(self) -> None:
        self.publisher.write_now()

    def _open_transport(self) -> Transport:
        """A transport like the publisher's (same broker, routing and task options), for the outbox relay."""
        return transport_for(self.celery_app, self.task_options())

    def record_refused(self, emission: Emission, reason: str) -> None:
        """An emission the broker never takes (too big): one failed-events record per listener it was for."""
        from litestar_celery_events.contract.failures import ListenerFailure
        from litestar_celery_events.stores.state import failed_store_for

        listeners = emission.listeners
        if listeners is None and emission.task_name != self.config.event_task_name(emission.event_id):
            listeners = (emission.task_name.rpartition("[")[2].removesuffix("]"),)  # a listener's own task
        if listeners is None:
            listeners = tuple(spec.name for spec in self.registry.by_event.get(emission.event_id, ()))
        headers = emission.extra_headers or {}
        failure = ListenerFailure(
            event_id=emission.event_id,
            emission_id=str(headers.get("root_id") or emission.emission_id),
            listener="",
            args=list(emission.args),
            kwargs=dict(emission.kwargs),
            exc_type="litestar_celery_events.transports.base.MessageRefused",
            message=reason,
            traceback="",
            attempts=0,
            permanent=True,
            emitted_at=emission.emitted_at,
        )
        store = failed_store_for(self.config, self.celery_app)
        try:
            for name in listeners:
                failure.listener = name
                try:
                    store.add(failure)
                except Exception:  # noqa: BLE001 - the arguments may be too big for the store too: keep the rest
                    store.close()
                    without = dataclasses.replace(failure, args=[], kwargs={})
                    without.message = f"{reason} (arguments not kept: {len(emission.body)} bytes encoded)"
                    store.add(without)
        finally:
            store.close()

    def submit(self, emission: Emission) -> str:
        outbox = self.outbox
        if outbox is None or not outbox.hold(emission):
            self.publisher.submit(emission)
        return emission.emission_id


def emitter_of(app: Litestar) -> CeleryEventEmitter:
    """The emitter of ``app``; ``PluginNotInstalledError`` when the app has no ``CeleryEventsPlugin``."""
    emitter = app.event_emitter
    if not isinstance(emitter, CeleryEventEmitter):
        raise PluginNotInstalledError
    return emitter
