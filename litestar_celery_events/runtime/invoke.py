"""Calling one listener: the original function, sync directly, async on the persistent loop."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

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
    result = run_coroutine(spec.fn(*args, **kwargs)) if spec.is_async else spec.fn(*args, **kwargs)
    if result is not None:
        logger.debug("listener %s returned %r; listener return values are ignored", spec.name, result)
