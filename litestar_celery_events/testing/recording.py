"""``fake_events``: record what the app emits instead of publishing it (no broker, no listener runs)."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from litestar_celery_events.emitter import CeleryEventEmitter, emitter_of
from litestar_celery_events.publisher import Publisher

if TYPE_CHECKING:
    from litestar import Litestar

    from litestar_celery_events.contract.message import Emission

__all__ = ("EmittedEvent", "EventRecorder", "ListenerFailedError", "ListenerRun", "fake_events", "swap_publisher")


class ListenerFailedError(AssertionError):
    """A listener failed for good while ``inline_events`` ran it (raised when the block ends)."""


@dataclass(frozen=True)
class EmittedEvent:
    """One recorded emission: the arguments as they were sent (typed payloads as JSON-ready values)."""

    event_id: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    emission_id: str
    eta: str | None = None
    """ISO due time of a delayed event (``emit_later``), else ``None``."""


@dataclass(frozen=True)
class ListenerRun:
    """One attempt of one listener in inline mode."""

    event_id: str
    listener: str
    attempt: int
    error: BaseException | None = None


class _NoBroker:
    """The transport of the recording publisher: there is nothing to publish to."""

    def publish(self, batch: list[Emission], done: list[int]) -> None:
        raise RuntimeError("fake_events/inline_events publish nothing")

    def close(self) -> None:
        return None


class _RecordingPublisher(Publisher):
    """Stands in for the publisher: hands each emission to ``record``, never talks to a broker."""

    def __init__(self, emitter: CeleryEventEmitter, record: Callable[[Emission], None]) -> None:
        config = emitter.config
        if getattr(config, "spool", False):
            config = dataclasses.replace(config, spool=False)  # no spool files in tests
        super().__init__(emitter.celery_app, config, transport=_NoBroker())
        self._record = record

    def start(self) -> None:
        return None

    def submit(self, emission: Emission) -> None:
        self._record(emission)
        if self.on_published is not None:  # recorded counts as published: the outbox clears its row
            self.on_published([emission])

    def stop(self, timeout_s: float | None = None) -> int:
        return 0


def _match(event: EmittedEvent, args: tuple[Any, ...] | None, kwargs: dict[str, Any] | None) -> bool:
    return (args is None or event.args == args) and (kwargs is None or event.kwargs == kwargs)


@dataclass
class EventRecorder:
    """What ``fake_events`` yields: every emission, in order, and assertions over them."""

    emitter: CeleryEventEmitter
    emitted: list[EmittedEvent] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, emission: Emission) -> None:
        event = EmittedEvent(emission.event_id, emission.args, emission.kwargs, emission.emission_id, emission.eta)
        with self._lock:
            self.emitted.append(event)

    def of(self, event_id: str) -> list[EmittedEvent]:
        """The emissions of ``event_id``, in order."""
        return [event for event in self.emitted if event.event_id == event_id]

    def clear(self) -> None:
        with self._lock:
            self.emitted.clear()

    def _normalised(self, event_id: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
        """Expected arguments as they are recorded: typed payloads become their JSON-ready values."""
        payload = self.emitter.registry.payloads.get(event_id)
        return payload.encode(event_id, args, kwargs) if payload is not None else (args, kwargs)

    def _summary(self) -> str:
        if not self.emitted:
            return "nothing was emitted"
        lines = [f"  {e.event_id}(args={e.args!r}, kwargs={e.kwargs!r})" for e in self.emitted]
        return "emitted:\n" + "\n".join(lines)

    def assert_emitted(self, event_id: str, *args: Any, **kwargs: Any) -> EmittedEvent:
        """``event_id`` was emitted; with arguments given, with exactly these. Returns the (first) match."""
        expected_args, expected_kwargs = (None, None)
        if args or kwargs:
            expected_args, expected_kwargs = self._normalised(event_id, args, kwargs)
        matches = [e for e in self.of(event_id) if _match(e, expected_args, expected_kwargs)]
        if not matches:
            wanted = f"{event_id}(args={args!r}, kwargs={kwargs!r})" if args or kwargs else event_id
            raise AssertionError(f"expected {wanted} to be emitted; {self._summary()}")
        return matches[0]

    def assert_emitted_times(self, event_id: str, times: int) -> None:
        """``event_id`` was emitted exactly ``times`` times."""
        count = len(self.of(event_id))
        if count != times:
            raise AssertionError(f"expected {event_id} {times} time(s), emitted {count} time(s); {self._summary()}")

    def assert_not_emitted(self, event_id: str) -> None:
        if self.of(event_id):
            raise AssertionError(f"expected {event_id} not to be emitted; {self._summary()}")

    def assert_nothing_emitted(self) -> None:
        if self.emitted:
            raise AssertionError(f"expected no events; {self._summary()}")


@contextlib.contextmanager
def swap_publisher(recorder: EventRecorder) -> Iterator[None]:
    emitter = recorder.emitter
    original, was_running = emitter.publisher, emitter.running
    emitter.publisher = _RecordingPublisher(emitter, recorder.record)
    emitter.publisher.on_published = original.on_published
    emitter.start()  # also usable without the app's lifespan: app.emit works at once
    try:
        yield
    finally:
        emitter.publisher = original
        emitter._running = was_running


@contextlib.contextmanager
def fake_events(app: Litestar) -> Iterator[EventRecorder]:
    """Record the app's emissions instead of publishing them: no broker, no listener runs.

    ``emit`` still checks everything it checks in production and raises the same errors.
    """
    recorder = EventRecorder(emitter_of(app))
    with swap_publisher(recorder):
        yield recorder
