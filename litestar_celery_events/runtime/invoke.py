"""Calling one listener: the original function, sync in the pool's thread, async on the process loop.

A listener with injected parameters gets them resolved on the process loop, in a scope of its own
per call (``runtime.dependencies``); its sync function still runs in the pool's thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from litestar_celery_events.runtime.dependencies import finish_call_scope, injector_for, new_call_scope
from litestar_celery_events.runtime.event_loop import run_coroutine

if TYPE_CHECKING:
    from litestar_celery_events.listeners import ListenerSpec

__all__ = ("call_listener",)

logger = logging.getLogger("litestar_celery_events.worker")


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
    else:
        result = run_coroutine(spec.fn(*args, **kwargs)) if spec.is_async else spec.fn(*args, **kwargs)
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

        return run_coroutine(run())
    values, cleanup = run_coroutine(injector.resolve(app, state, call_scope))
    try:
        result = spec.fn(*args, **kwargs, **values)
    except BaseException as exc:
        run_coroutine(finish_call_scope(app, call_scope, cleanup, exc))
        raise
    run_coroutine(finish_call_scope(app, call_scope, cleanup, None))
    return result
