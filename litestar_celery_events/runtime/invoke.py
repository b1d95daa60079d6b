"""Calling one listener: the original function, sync in the pool's thread, async on the process loop.

A listener with injected parameters gets them resolved on the process loop, in a scope of its own
per call (``runtime.dependencies``); its sync function still runs in the pool's thread.

The asyncio pool (``aio_pool``) swaps the two runners: there every coroutine of a listener call
runs as a task on the loop while the task's greenlet waits, and sync functions run on its threads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from litestar_celery_events.runtime.dependencies import finish_call_scope, injector_for, new_call_scope
from litestar_celery_events.runtime.event_loop import run_coroutine

if TYPE_CHECKING:
    from litestar_celery_events.listeners import ListenerSpec

__all__ = ("call_listener", "run_async_listener", "run_sync_listener")

logger = logging.getLogger("litestar_celery_events.worker")


def _call_directly(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return fn(*args, **kwargs)


run_async_listener: Callable[[Coroutine[Any, Any, Any]], Any] = run_coroutine
"""Runs a coroutine of a listener call (the listener, its dependencies) to completion."""
run_sync_listener: Callable[[Callable[..., Any], tuple[Any, ...], dict[str, Any]], Any] = _call_directly
"""Calls a sync listener."""


def call_listener(
    spec: ListenerSpec,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    scope: Callable[[ListenerSpec], AbstractContextManager[Any]] | None = None,
) -> None:
    """Run ``spec`` inside ``scope`` (a trace span, the log context); its exceptions propagate (that
    is what makes Celery retry). Typed parameters are rebuilt from their JSON first
    (``PayloadDecodeError`` if one does not fit).
    """
    if scope is not None:
        with scope(spec):
            _call(spec, args, kwargs)
    else:
        _call(spec, args, kwargs)


def _call(spec: ListenerSpec, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    if spec.payload is not None:
        args, kwargs = spec.payload.decode(args, kwargs)
    if spec.injection.names:
        result = _call_injected(spec, args, kwargs)
    elif spec.is_async:
        result = run_async_listener(spec.fn(*args, **kwargs))
    else:
        result = run_sync_listener(spec.fn, args, kwargs)
    if result is not None:
        logger.debug("listener %s returned %r; listener return values are ignored", spec.name, result)


def _call_injected(spec: ListenerSpec, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    app, state, injector = injector_for(spec)
    call_scope = new_call_scope(app, spec.name)
    if spec.is_async:

        async def run() -> Any:
            values, cleanup = await injector.resolve(app, state, call_scope)
            try:
                result = await spec.fn(*args, **kwargs, **values)
            except BaseException as exc:
                await finish_call_scope(app, call_scope, cleanup, exc)
                raise
            await finish_call_scope(app, call_scope, cleanup, None)
            return result

        return run_async_listener(run())
    values, cleanup = run_async_listener(injector.resolve(app, state, call_scope))
    try:
        result = run_sync_listener(spec.fn, args, {**kwargs, **values})
    except BaseException as exc:
        run_async_listener(finish_call_scope(app, call_scope, cleanup, exc))
        raise
    run_async_listener(finish_call_scope(app, call_scope, cleanup, None))
    return result
