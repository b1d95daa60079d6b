"""One Celery task per event (``<prefix>.<event_id>``) and one per routed or retried listener.

The event task runs its listeners in turn. A listener that fails is retried as a task of its
own (``<prefix>.<event_id>[<listener>]``), so the listeners that already succeeded for the
same emission never run again. Listeners with routing options (queue, rate or time limits)
always run as their own task.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import celery
from celery import Task
from celery.exceptions import TimeLimitExceeded
from celery.utils.time import get_exponential_backoff_interval
from celery.worker import state as worker_state
from celery.worker.request import Request

from litestar_celery_events.contract.message import DUE_AT_HEADER, EMITTED_AT_HEADER, EVENT_HEADER, LISTENERS_HEADER
from litestar_celery_events.contract.payloads import PayloadDecodeError
from litestar_celery_events.errors import ListenerSignatureError
from litestar_celery_events.runtime.failures import ListenerFailure, failure_from_exception, report_failure
from litestar_celery_events.runtime.invoke import call_listener
from litestar_celery_events.runtime.mover import cancelled_before_run, forget_dead_letter_headers

if TYPE_CHECKING:
    from collections.abc import Mapping

    from celery import Celery

    from litestar_celery_events.config import CeleryEventsConfig
    from litestar_celery_events.listeners import ListenerRegistry, ListenerSpec
    from litestar_celery_events.runtime.ledger import RunOnce
    from litestar_celery_events.runtime.observability import ListenerScope

__all__ = ("register_event_tasks",)

logger = logging.getLogger("litestar_celery_events.worker")

AT_LEAST_ONCE = {"acks_late": True, "reject_on_worker_lost": True, "ignore_result": True}


PERMANENT_ERRORS = (ListenerSignatureError, PayloadDecodeError)
"""The arguments do not fit the listener (its signature or a typed parameter): never retried."""

CELERY_REPORTS_HARD_TIME_LIMITS = celery.VERSION >= (5, 7)
"""Celery 5.7 calls ``Task.on_failure`` when a hard time limit kills a task; earlier versions do not."""


def first_retry_countdown(options: Mapping[str, Any]) -> float:
    """The delay Celery's autoretry would use before retry number 1."""
    backoff = options.get("retry_backoff", False)
    if backoff:
        return float(
            get_exponential_backoff_interval(
                factor=int(max(1.0, float(backoff))),
                retries=0,
                maximum=int(options.get("retry_backoff_max", 600)),
                full_jitter=bool(options.get("retry_jitter", True)),
            )
        )
    return float(options.get("default_retry_delay", 180))


def _check_arguments(spec: ListenerSpec, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    problem = spec.argument_problem(args, kwargs)
    if problem is not None:
        raise ListenerSignatureError(f"listener {spec.name} {problem}")


def _failure(
    task: Task, spec_name: str, exc: BaseException, args: Any, kwargs: Any, attempts: int, task_id: str | None = None
) -> ListenerFailure:
    # After a hard time limit Celery calls on_failure in the main process: no request context
    # there, so the emission id comes from the listener task's id (``<emission id>:<listener>``).
    request = task.request
    return failure_from_exception(
        exc,
        event_id=request.get(EVENT_HEADER) or getattr(task, "event_id", None) or task.name,
        emission_id=str(request.get("root_id") or request.id or (task_id or "?").removesuffix(f":{spec_name}")),
        listener=spec_name,
        args=list(args),
        kwargs=dict(kwargs),
        attempts=attempts,
        permanent=isinstance(exc, PERMANENT_ERRORS) or not isinstance(exc, Exception),
        emitted_at=request.get(EMITTED_AT_HEADER),
    )


class ListenerRequest(Request):  # type: ignore[misc]
    """A listener task's request: a hard time limit is a failure record on every supported Celery."""

    def on_timeout(self, soft: bool, timeout: float) -> None:
        super().on_timeout(soft, timeout)
        # Before 5.7 Celery only logs the kill and tells the result backend (none here): without
        # this the listener would vanish from the failed store. Not during a cold shutdown (as 5.7).
        if not soft and not CELERY_REPORTS_HARD_TIME_LIMITS and not worker_state.should_terminate:
            self.task.on_failure(TimeLimitExceeded(timeout), self.id, self.args, self.kwargs, None)


class ListenerTask(Task):  # type: ignore[misc]
    """A listener run as a task of its own; Celery's autoretry does the retrying."""

    spec: ListenerSpec
    event_id: str
    dont_autoretry_for = PERMANENT_ERRORS
    Request = ListenerRequest

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        attempts = self.request.retries + 1
        report_failure(_failure(self, self.spec.name, exc, args, kwargs, attempts=attempts, task_id=task_id))


def _register_listener_task(
    celery_app: Celery,
    config: CeleryEventsConfig,
    event_id: str,
    spec: ListenerSpec,
    scope: ListenerScope | None,
    run_once: RunOnce | None,
) -> Task:
    def run_listener(self: ListenerTask, *args: Any, **kwargs: Any) -> None:
        emission_id = ""
        if run_once is not None:  # skip a listener that completed for this emission (a duplicate)
            # Listener tasks are ``<emission id>:<listener>`` (escalations, routed listeners, replays).
            task_id, own = str(self.request.id), f":{spec.name}"
            emission_id = task_id[: -len(own)] if task_id.endswith(own) else str(self.request.get("root_id") or task_id)
            if spec.name in run_once.completed(emission_id):
                run_once.skipped(event_id, emission_id, spec.name)
                return
        _check_arguments(spec, args, kwargs)
        call_listener(spec, args, kwargs, scope)
        if run_once is not None:
            run_once.record(emission_id, spec.name)

    options = {**spec.task_options, **{k: v for k, v in AT_LEAST_ONCE.items() if k not in spec.task_options}}
    task: Task = celery_app.task(
        name=config.listener_task_name(event_id, spec.name),
        base=ListenerTask,
        bind=True,
        shared=False,
        spec=spec,
        event_id=event_id,
        **options,
    )(run_listener)
    return task


def _register_event_task(
    celery_app: Celery,
    config: CeleryEventsConfig,
    event_id: str,
    specs: tuple[ListenerSpec, ...],
    listener_tasks: dict[str, Task],
    scope: ListenerScope | None,
    run_once: RunOnce | None,
) -> Task:
    def run_event(self: Task, *args: Any, **kwargs: Any) -> None:
        request = self.request
        if request.get(DUE_AT_HEADER) is not None:
            forget_dead_letter_headers(self)  # it came through RabbitMQ's delay levels
        if cancelled_before_run(self):  # emit_later on a broker without the delayed store
            return
        emission_id = request.id
        only = request.get(LISTENERS_HEADER)
        targets = specs if only is None else [s for s in specs if s.name in only]
        for name in set(only or ()) - {s.name for s in specs}:
            exc = LookupError(f"event {event_id!r} has no registered listener {name!r}")
            failure = _failure(self, name, exc, args, kwargs, attempts=0)
            failure.permanent = True  # no retry can make an unregistered listener appear
            report_failure(failure)
        done = run_once.completed(emission_id) if run_once is not None else ()
        for spec in targets:
            listener_task = listener_tasks[spec.name]
            if spec.name in done:  # completed when this emission came before (run_once is set)
                run_once.skipped(event_id, emission_id, spec.name)  # type: ignore[union-attr]
                continue
            if spec.runs_as_own_task:
                listener_task.apply_async(args, kwargs, task_id=f"{emission_id}:{spec.name}", headers=_headers(request))
                continue
            try:
                _check_arguments(spec, args, kwargs)
                call_listener(spec, args, kwargs, scope)
            except Exception as exc:  # noqa: BLE001 - each listener fails on its own
                _escalate(self, spec, listener_task, exc, args, kwargs)
            else:
                if run_once is not None:
                    run_once.record(emission_id, spec.name)

    def _escalate(self: Task, spec: ListenerSpec, listener_task: Task, exc: Exception, args: Any, kwargs: Any) -> None:
        options = spec.task_options
        max_retries = options.get("max_retries")
        retryable = (
            not isinstance(exc, PERMANENT_ERRORS)
            and isinstance(exc, tuple(options.get("autoretry_for", ())))
            and (max_retries is None or max_retries > 0)
        )
        if not retryable:
            report_failure(_failure(self, spec.name, exc, args, kwargs, attempts=1))
            return
        countdown = first_retry_countdown(options)
        logger.warning(
            "listener %s failed on event %r (emission %s): %s: %s; retry 1 in %.1fs",
            spec.name,
            event_id,
            self.request.id,
            type(exc).__name__,
            exc,
            countdown,
            extra={"event_id": event_id, "emission_id": self.request.id, "listener": spec.name},
        )
        listener_task.apply_async(
            args,
            kwargs,
            task_id=f"{self.request.id}:{spec.name}",
            retries=1,
            countdown=countdown,
            headers=_headers(self.request),
        )

    task: Task = celery_app.task(
        name=config.event_task_name(event_id),
        bind=True,
        shared=False,
        **AT_LEAST_ONCE,
    )(run_event)
    return task


def _headers(request: Any) -> dict[str, Any]:
    return {EVENT_HEADER: request.get(EVENT_HEADER), EMITTED_AT_HEADER: request.get(EMITTED_AT_HEADER)}


def register_event_tasks(
    celery_app: Celery,
    registry: ListenerRegistry,
    config: CeleryEventsConfig,
    scope: ListenerScope | None = None,
    run_once: RunOnce | None = None,
) -> list[str]:
    """Register the tasks of every event in ``registry`` (each listener call inside ``scope``); return their names."""
    names: list[str] = []
    for event_id, specs in registry.by_event.items():
        listener_tasks = {
            spec.name: _register_listener_task(celery_app, config, event_id, spec, scope, run_once) for spec in specs
        }
        names.append(_register_event_task(celery_app, config, event_id, specs, listener_tasks, scope, run_once).name)
        names.extend(task.name for task in listener_tasks.values())
    return names
