"""Listener dependencies in the worker: resolved per listener call as Litestar resolves a handler's.

Each call gets a scope of its own, as a request does: providers run in dependency order (sync or
async, Litestar's ``Provide`` with its ``use_cache`` and ``sync_to_thread``), generator providers
are cleaned up right after the listener returns (the exception thrown into them when it raised),
then the app's ``before_send`` hooks see the end of the call as an ``http.response.start`` message:
status 200 when the listener succeeded, 500 when it raised. That is how advanced-alchemy's plugin
closes (and, with ``before_send_handler="autocommit"``, commits or rolls back) the ``db_session`` of
a request, and it does the same for a listener call, with one difference: its autocommit handler
logs a failed commit at debug level and goes on, so here an autocommit session is committed
first, explicitly, and a commit that fails fails the listener (Celery retries it).

The plan of each listener (which provider feeds which) is built once at worker start-up, where a
provider that needs something a listener call cannot give (``request``, ``headers``, a query
parameter) or that no layer provides stops the worker with the listener and the name.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from litestar._kwargs.cleanup import DependencyCleanupGroup
from litestar.exceptions import ImproperlyConfiguredException
from litestar.utils.compat import async_next

from litestar_celery_events.contract.injection import BUILTIN_INJECTIONS, as_provider
from litestar_celery_events.listeners import unprovided_message

if TYPE_CHECKING:
    from collections.abc import Mapping

    from litestar import Litestar
    from litestar.datastructures import State
    from litestar.di import Provide

    from litestar_celery_events.listeners import ListenerRegistry, ListenerSpec

__all__ = ("ListenerInjector", "finish_call_scope", "new_call_scope", "prepare_injectors")

logger = logging.getLogger("litestar_celery_events.worker")

SCOPE_LISTENER_KEY = "litestar_celery_events.listener"
PER_CALL_NAMES = frozenset({"scope"})
"""What a provider may ask for besides other dependencies and ``app``/``state``: the call's scope."""
REQUEST_ONLY_NAMES = frozenset({"request", "socket", "headers", "cookies", "query", "data", "body"})
AUTOCOMMIT_HANDLER = "autocommit_handler_maker.<locals>.handler"
"""advanced-alchemy's autocommit ``before_send`` handler (its closure names the session's scope key)."""
AA_SCOPE_NAMESPACE = "_aa_connection_state"


def new_call_scope(app: Litestar, listener: str) -> dict[str, Any]:
    """The per-call scope: what a request's scope offers that means something without a request."""
    return {
        "type": "http",
        "app": app,
        "litestar_app": app,
        "state": {},
        "path_params": {},
        "headers": [],
        "query_string": b"",
        "extensions": {},
        SCOPE_LISTENER_KEY: listener,
    }


@dataclass(frozen=True)
class _Step:
    key: str
    provide: Provide
    arguments: tuple[str, ...]


def _parameters(provide: Provide) -> list[inspect.Parameter]:
    dependency = getattr(provide.dependency, "func", provide.dependency)  # sync_to_thread wraps it
    return list(inspect.signature(dependency).parameters.values())


@dataclass(frozen=True)
class ListenerInjector:
    """How one listener's injected parameters are produced: providers in the order they must run."""

    listener: str
    steps: tuple[_Step, ...]
    injected: tuple[str, ...]
    defaults: Mapping[str, Any]

    @classmethod
    def build(cls, spec: ListenerSpec, app: Litestar) -> ListenerInjector:
        if spec.injection.unprovided:
            raise ImproperlyConfiguredException(unprovided_message(spec.name, spec.injection.unprovided))
        providers = {**{k: as_provider(v) for k, v in app.dependencies.items()}, **spec.dependencies}
        steps: list[_Step] = []
        done: set[str] = set()

        def visit(key: str, path: tuple[str, ...]) -> None:
            if key in done:
                return
            if key in path:
                raise ImproperlyConfiguredException(
                    f"listener {spec.name}: dependencies form a cycle: {' -> '.join((*path, key))}"
                )
            arguments = []
            for param in _parameters(providers[key]):
                if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                    continue
                if param.name in providers:
                    visit(param.name, (*path, key))
                elif param.name in REQUEST_ONLY_NAMES and param.default is param.empty:
                    raise ImproperlyConfiguredException(
                        f"listener {spec.name}: dependency {key!r} needs {param.name!r}, which only a request "
                        "has; a listener call has no request (give the listener its own provider for "
                        f"{key!r} with dependencies={{...}})"
                    )
                elif param.name not in BUILTIN_INJECTIONS | PER_CALL_NAMES:
                    if param.default is param.empty:
                        raise ImproperlyConfiguredException(
                            f"listener {spec.name}: dependency {key!r} needs {param.name!r}, which no layer provides"
                        )
                    continue
                arguments.append(param.name)
            done.add(key)
            steps.append(_Step(key, providers[key], tuple(arguments)))

        defaults: dict[str, Any] = {}
        for name in sorted(spec.injection.names):
            if name in providers:
                visit(name, ())
            elif name not in BUILTIN_INJECTIONS:
                defaults[name] = inspect.signature(spec.fn).parameters[name].default.default
        return cls(spec.name, tuple(steps), tuple(sorted(spec.injection.names)), defaults)

    async def resolve(
        self, app: Litestar, state: State, scope: dict[str, Any]
    ) -> tuple[dict[str, Any], DependencyCleanupGroup]:
        """The listener's injected values, and the generators to clean up after the call."""
        values: dict[str, Any] = {"app": app, "state": state, "scope": scope, **self.defaults}
        cleanup = DependencyCleanupGroup()
        try:
            for step in self.steps:
                value = await step.provide(**{name: values[name] for name in step.arguments})
                if step.provide.has_sync_generator_dependency:
                    cleanup.add(value)
                    value = next(value)
                elif step.provide.has_async_generator_dependency:
                    cleanup.add(value)
                    value = await async_next(value)
                values[step.key] = value
        except BaseException as exc:  # a provider failed: end the call scope as a failed call
            await finish_call_scope(app, scope, cleanup, exc)
            raise
        return {name: values[name] for name in self.injected}, cleanup


async def _close(cleanup: DependencyCleanupGroup, exc: BaseException | None) -> None:
    if exc is None:
        await _end_generators(cleanup, None)
        return
    try:
        await _end_generators(cleanup, exc)
    except Exception:  # the listener's own error is the one that counts
        logger.exception("cleaning up the dependencies of a failed listener call failed too")


async def _end_generators(cleanup: DependencyCleanupGroup, exc: BaseException | None) -> None:
    """Resume each generator dependency after the call, or throw the call's error into it."""
    if hasattr(cleanup, "close"):
        await cleanup.close(exc)
        return
    older: Any = cleanup  # Litestar before close() (2.12, the lowest supported): cleanup() and throw(exc)
    await (older.cleanup() if exc is None else older.throw(exc))


def _autocommit_scope_keys(app: Litestar) -> list[str]:
    keys = []
    for wrapped in app.before_send:
        hook = getattr(wrapped, "func", wrapped)
        if getattr(hook, "__qualname__", "") == AUTOCOMMIT_HANDLER:
            key = inspect.getclosurevars(hook).nonlocals.get("session_scope_key")
            if isinstance(key, str):
                keys.append(key)
    return keys


async def _commit_autocommit_sessions(app: Litestar, scope: dict[str, Any]) -> None:
    sessions = scope.get(AA_SCOPE_NAMESPACE) or {}
    for key in _autocommit_scope_keys(app):
        session = sessions.get(key)
        if session is not None:
            result = session.commit()
            if inspect.isawaitable(result):
                await result


async def finish_call_scope(
    app: Litestar, scope: dict[str, Any], cleanup: DependencyCleanupGroup, error: BaseException | None
) -> None:
    """End a listener call: clean up generator dependencies, commit, then the app's ``before_send`` hooks.

    Raises when the listener succeeded but its cleanup or commit did not (the listener then fails).
    """
    try:
        await _close(cleanup, error)
        if error is None:
            await _commit_autocommit_sessions(app, scope)
    except BaseException as exc:
        error = exc
        raise
    finally:
        message: dict[str, Any] = {
            "type": "http.response.start",
            "status": 200 if error is None else 500,
            "headers": [],
        }
        for hook in app.before_send:
            try:
                await hook(message, scope)  # type: ignore[arg-type]
            except Exception:
                if error is not None:
                    logger.exception("a before_send hook failed while ending a failed listener call")
                    continue
                raise


@dataclass(frozen=True)
class _Prepared:
    spec: ListenerSpec  # kept so that its id is never reused
    app: Litestar
    state: State | None
    injector: ListenerInjector


_prepared: dict[int, _Prepared] = {}


def prepare_injectors(
    app: Litestar, registry: ListenerRegistry, state: State | None = None
) -> dict[str, ListenerInjector]:
    """Build every listener's plan now (errors stop the worker at start-up) and keep them for calls.

    ``state``: what listeners get as ``state`` (default: ``app.state`` at each call).
    """
    built: dict[str, ListenerInjector] = {}
    for spec in registry.by_name.values():
        if spec.injection.names or spec.injection.unprovided:
            built[spec.name] = injector = ListenerInjector.build(spec, app)
            _prepared[id(spec)] = _Prepared(spec, app, state, injector)
    return built


def injector_for(spec: ListenerSpec) -> tuple[Litestar, State, ListenerInjector]:
    found = _prepared.get(id(spec))
    if found is None:
        raise RuntimeError(f"listener {spec.name} has injected parameters but this process loaded no Litestar app")
    return found.app, found.app.state if found.state is None else found.state, found.injector
