"""Which listener parameters are injected rather than emitted: worked out once, at registration.

A parameter is injected when a layer provides it (the app's ``dependencies``, the listener's own
``dependencies=``), when it is ``app`` or ``state`` (unannotated, or annotated ``Litestar`` /
``State``), or when it is marked as a dependency the way a route handler marks one
(``NamedDependency[T]``, ``= Dependency()``). ``emit`` checks only the other parameters; a marked
parameter that no layer provides is reported with the listener and the parameter's name.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from litestar import Litestar
from litestar.datastructures import ImmutableState
from litestar.di import Provide
from litestar.exceptions import ImproperlyConfiguredException
from litestar.params import DependencyKwarg
from litestar.types import Empty

try:
    from litestar.di import Dependency as NamedDependencyMarker

    NAMED_DEPENDENCY_MARKERS: tuple[type, ...] = (NamedDependencyMarker,)
except ImportError:  # Litestar 2.12 (the lowest supported) has no NamedDependency[T] to mark a parameter with
    NAMED_DEPENDENCY_MARKERS = ()

__all__ = ("BUILTIN_INJECTIONS", "Injection", "as_provider", "injection_of")

BUILTIN_INJECTIONS = frozenset({"app", "state"})
"""Parameter names a listener gets without any provider: the Litestar app and ``app.state``."""
_BUILTIN_TYPES: dict[str, tuple[type, ...]] = {"app": (Litestar,), "state": (ImmutableState,)}


@dataclass(frozen=True)
class Injection:
    """A listener's injected parameters, and the marked ones no layer provides."""

    names: frozenset[str] = frozenset()
    """Every injected parameter (provided, built in, or marked with a default)."""
    unprovided: tuple[str, ...] = ()
    """Marked as a dependency (``NamedDependency[T]``, ``Dependency()``), provided by no layer, no default."""


def as_provider(value: Any) -> Provide:
    """A dependency as Litestar takes it (``Provide(...)`` or a bare callable) as a ``Provide``."""
    return value if isinstance(value, Provide) else Provide(value, sync_to_thread=False)


def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn, include_extras=True)
    except Exception:  # noqa: BLE001 - unresolvable annotations: judged by name and default only
        return {}


def _marked(param: inspect.Parameter, hint: Any) -> bool:
    if isinstance(param.default, DependencyKwarg):
        return True
    metadata = getattr(hint, "__metadata__", ())
    return any(isinstance(item, NAMED_DEPENDENCY_MARKERS) for item in metadata)


def _builtin(param: inspect.Parameter, hint: Any) -> bool:
    if param.name not in BUILTIN_INJECTIONS:
        return False
    if param.annotation is param.empty:
        return True
    raw = param.annotation if isinstance(param.annotation, str) else getattr(param.annotation, "__name__", "")
    hint = getattr(hint, "__origin__", hint) if getattr(hint, "__metadata__", None) else hint
    if isinstance(hint, type):
        return issubclass(hint, _BUILTIN_TYPES[param.name])
    return raw.rsplit(".", 1)[-1] in {"Litestar", "State", "ImmutableState"}


def injection_of(fn: Callable[..., Any], provided: Mapping[str, Any], owner: str) -> Injection:
    """Classify ``fn``'s parameters; ``provided`` holds every dependency name a layer provides."""
    hints = _hints(fn)
    names: set[str] = set()
    unprovided: list[str] = []
    for param in inspect.signature(fn).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        hint = hints.get(param.name)
        if param.name in provided or _builtin(param, hint):
            names.add(param.name)
        elif _marked(param, hint):
            has_default = isinstance(param.default, DependencyKwarg) and param.default.default is not Empty
            if has_default:
                names.add(param.name)
            else:
                unprovided.append(param.name)
        else:
            continue
        if param.kind is param.POSITIONAL_ONLY:
            raise ImproperlyConfiguredException(
                f"{owner}: injected parameter {param.name!r} is positional-only; make it a keyword parameter"
            )
    return Injection(frozenset(names), tuple(unprovided))
