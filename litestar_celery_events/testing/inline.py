"""``inline_events``: run the app's listeners in the test process, with the worker's rules."""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kombu.utils.json import loads as kombu_loads
from litestar.datastructures import State

from litestar_celery_events.contract.payloads import PayloadDecodeError
from litestar_celery_events.emitter import emitter_of
from litestar_celery_events.errors import ListenerSignatureError
from litestar_celery_events.runtime.dependencies import prepare_injectors
from litestar_celery_events.runtime.failures import ListenerFailure, failure_from_exception
from litestar_celery_events.runtime.invoke import call_listener
from litestar_celery_events.runtime.lifespan import WorkerLifespan

if TYPE_CHECKING:
    from litestar import Litestar

    from litestar_celery_events.contract.message import Emission
    from litestar_celery_events.listeners import ListenerSpec

from litestar_celery_events.testing.recording import EventRecorder, ListenerFailedError, ListenerRun, swap_publisher

__all__ = ("InlineEvents", "inline_events")

logger = logging.getLogger("litestar_celery_events.testing")

UNLIMITED_RETRIES_CAP = 10
"""Inline mode runs a listener with ``max_retries=None`` (Celery: retry forever) at most this often."""


@dataclass
class InlineEvents(EventRecorder):
    """What ``inline_events`` yields: the recorder, plus every listener attempt and final failure."""

    runs: list[ListenerRun] = field(default_factory=list)
    failures: list[ListenerFailure] = field(default_factory=list)
    _executor: ThreadPoolExecutor | None = field(default=None, repr=False)
    _pending: deque[Emission] | None = field(default=None, repr=False)

    def record(self, emission: Emission) -> None:
        super().record(emission)
        pending = self._pending
        if pending is not None:
            # A listener emitted (maybe from the listener loop, which cannot wait for itself):
            # its event's listeners run as soon as the current listener returns, as on a worker.
            pending.append(emission)
        elif self._executor is None:
            self._drain(emission)
        else:
            # One runner thread, waited for, so the listeners have run when ``emit`` returns and
            # sync listeners never run on the caller's event loop thread.
            self._executor.submit(self._drain, emission).result()

    def _drain(self, emission: Emission) -> None:
        self._pending = pending = deque([emission])
        try:
            while pending:
                self._run(pending.popleft())
        finally:
            self._pending = None

    def _run(self, emission: Emission) -> None:
        args_json, kwargs_json, _ = kombu_loads(emission.body)  # exactly what a worker would get
        args, kwargs = tuple(args_json), dict(kwargs_json)
        specs = self.emitter.registry.by_event.get(emission.event_id, ())
        only = emission.listeners
        for spec in specs:
            if only is None or spec.name in only:
                self._run_listener(emission, spec, args, kwargs)

    def _run_listener(
        self, emission: Emission, spec: ListenerSpec, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        options = spec.task_options
        max_retries = options.get("max_retries")
        attempts_allowed = 1 + (UNLIMITED_RETRIES_CAP if max_retries is None else int(max_retries))
        autoretry_for = tuple(options.get("autoretry_for", ()))
        attempt = 0
        while True:
            attempt += 1
            problem = spec.argument_problem(args, kwargs)
            try:
                if problem is not None:
                    raise ListenerSignatureError(f"listener {spec.name} {problem}")
                call_listener(spec, args, kwargs)
            except Exception as exc:  # noqa: BLE001 - recorded, and raised when the block ends
                self.runs.append(ListenerRun(emission.event_id, spec.name, attempt, exc))
                permanent = problem is not None or isinstance(exc, PayloadDecodeError)
                if not permanent and isinstance(exc, autoretry_for) and attempt < attempts_allowed:
                    continue  # retried at once: inline mode does not wait out retry delays
                self._fail(emission, spec, exc, args, kwargs, attempt, permanent)
                return
            self.runs.append(ListenerRun(emission.event_id, spec.name, attempt))
            return

    def _fail(
        self,
        emission: Emission,
        spec: ListenerSpec,
        exc: Exception,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        attempts: int,
        permanent: bool,
    ) -> None:
        failure = failure_from_exception(
            exc,
            event_id=emission.event_id,
            emission_id=emission.emission_id,
            listener=spec.name,
            args=list(args),
            kwargs=dict(kwargs),
            attempts=attempts,
            permanent=permanent,
            emitted_at=emission.emitted_at,
        )
        logger.error(
            "listener %s failed for good on event %r (emission %s) after %d attempt(s): %s",
            spec.name,
            emission.event_id,
            emission.emission_id,
            attempts,
            failure.message,
            extra={"event_id": emission.event_id, "emission_id": emission.emission_id, "listener": spec.name},
        )
        self.failures.append(failure)

    def ran(self, listener: str) -> list[ListenerRun]:
        """The attempts of ``listener`` (its full name ``module.function``, or just ``function``)."""
        return [r for r in self.runs if r.listener == listener or r.listener.endswith(f".{listener}")]

    def assert_ran(self, listener: str, times: int | None = None) -> None:
        """``listener`` succeeded (``times`` times, when given)."""
        succeeded = [r for r in self.ran(listener) if r.error is None]
        if not succeeded or (times is not None and len(succeeded) != times):
            runs = "\n".join(f"  {r.listener} attempt {r.attempt}: {r.error!r}" for r in self.runs) or "  none"
            raise AssertionError(f"expected {listener} to succeed{f' {times} time(s)' if times else ''}; runs:\n{runs}")

    def assert_no_failures(self) -> None:
        if self.failures:
            raise ListenerFailedError(
                "listener(s) failed for good: "
                + "; ".join(f"{f.listener} on {f.event_id}: {f.exc_type}: {f.message}" for f in self.failures)
            )


@contextlib.contextmanager
def inline_events(
    app: Litestar, *, raise_on_failure: bool = True, lifespan: bool | None = None
) -> Iterator[InlineEvents]:
    """Run the app's listeners in this process when events are emitted: no broker, no worker.

    Each emission's listeners have run when ``emit`` returns, with the worker's rules: the JSON the
    worker would get (typed payloads rebuilt), retries per the listener's options (without waiting
    out their delays), a failure recorded once retries are exhausted, dependencies injected per
    call. With ``raise_on_failure``, leaving the block raises ``ListenerFailedError`` if any
    listener failed for good.

    ``lifespan`` (default: the config's ``worker_lifespan``): start the app for the listeners as a
    worker process does: its lifespan and ``worker_on_startup``, on the loop that runs async
    listeners, into a ``State`` of the listeners' own (injected as ``state``, and what
    advanced-alchemy's ``db_session`` comes from), so a ``TestClient(app)`` in the same test keeps
    its own loop-bound resources in ``app.state`` whichever block is entered first. Keys the
    listeners' start-up adds that ``app.state`` lacks are copied there too; module globals are shared.
    """
    emitter = emitter_of(app)
    if lifespan is None:
        lifespan = emitter.config.worker_lifespan
    listener_state = State(dict(app.state.items())) if lifespan else None  # a dict of its own
    prepare_injectors(app, emitter.registry, listener_state)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inline-events")
    recorder = InlineEvents(emitter=emitter, _executor=executor)
    worker_lifespan = WorkerLifespan(app, emitter, run_app_lifespan=lifespan, state=listener_state)
    try:
        with swap_publisher(recorder):
            worker_lifespan.start()
            try:
                yield recorder
            finally:
                worker_lifespan.stop()
        if raise_on_failure:
            recorder.assert_no_failures()
    finally:
        executor.shutdown(wait=True)
