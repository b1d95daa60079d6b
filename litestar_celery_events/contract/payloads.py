"""Typed payloads: listener parameters annotated with a dataclass, msgspec Struct or pydantic model.

Such a parameter receives that type in the worker, rebuilt from the JSON the emitter sent; at
``emit`` the value is checked against the annotation and sent as JSON, so a value that does not
fit fails at the call site. Everything is worked out once, at registration: an event whose
listeners have no such parameter costs nothing per emit.

Declared events (``declare_event``) give an event id a payload contract of its own, so a web
process that does not import the listener code can still validate what it emits.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec

from litestar_celery_events.contract.events import validate_event_id
from litestar_celery_events.errors import EventPayloadError

__all__ = (
    "EventDeclaration",
    "EventPayload",
    "ListenerPayload",
    "PayloadDecodeError",
    "PayloadValidationError",
    "declare_event",
    "listener_payload",
)


class PayloadValidationError(EventPayloadError):
    """An emitted value does not fit a listener's (or the declared event's) annotation; nothing was enqueued."""


class PayloadDecodeError(TypeError):
    """In the worker: the JSON of an argument cannot be rebuilt into the listener's annotated type."""


class _Adapter(Protocol):
    def to_python(self, value: Any) -> Any:
        """JSON value (or an instance) -> the annotated type; raises on mismatch."""

    def to_json(self, value: Any) -> Any:
        """An instance (or its JSON form) -> checked JSON-ready builtins; raises on mismatch."""


class _MsgspecAdapter:
    """Dataclasses, msgspec Structs and containers of them, via msgspec (a Litestar dependency)."""

    __slots__ = ("annotation",)

    def __init__(self, annotation: Any) -> None:
        self.annotation = annotation

    def to_python(self, value: Any) -> Any:
        return msgspec.convert(value, self.annotation)

    def to_json(self, value: Any) -> Any:
        builtins = msgspec.to_builtins(value)  # an instance is checked field by field, not trusted
        msgspec.convert(builtins, self.annotation)
        return builtins


class _PydanticAdapter:
    """Annotations that contain a pydantic model (pydantic is used only when the app imports it)."""

    __slots__ = ("adapter",)

    def __init__(self, annotation: Any) -> None:
        from pydantic import TypeAdapter

        self.adapter: Any = TypeAdapter(annotation)

    def to_python(self, value: Any) -> Any:
        return self.adapter.validate_python(value)

    def to_json(self, value: Any) -> Any:
        return self.adapter.dump_python(self.adapter.validate_python(value), mode="json")


def _pydantic_model(tp: Any) -> bool:
    pydantic = sys.modules.get("pydantic")  # a model exists only if pydantic was imported
    return pydantic is not None and isinstance(tp, type) and issubclass(tp, pydantic.BaseModel)


def _structured(tp: Any) -> bool:
    if isinstance(tp, type) and (dataclasses.is_dataclass(tp) or issubclass(tp, msgspec.Struct) or _pydantic_model(tp)):
        return True
    return any(_structured(arg) for arg in typing.get_args(tp))


def _contains_pydantic(tp: Any) -> bool:
    return _pydantic_model(tp) or any(_contains_pydantic(arg) for arg in typing.get_args(tp))


def _describe(tp: Any) -> str:
    return tp.__qualname__ if isinstance(tp, type) else repr(tp).replace("typing.", "")


def _error_text(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):  # pydantic: the first error, with its location
        first = errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()))
        return f"{first.get('msg')}" + (f" at {where}" if where else "")
    return str(exc)


@dataclass(frozen=True)
class _TypedParameter:
    name: str
    position: int | None
    """Index among the positional parameters; ``None`` for keyword-only."""
    annotation: Any
    adapter: _Adapter


def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - an unresolvable forward reference: keep the ones that resolve
        hints: dict[str, Any] = {}
        namespace = getattr(fn, "__globals__", {})
        for name, raw in getattr(fn, "__annotations__", {}).items():
            try:
                hints[name] = eval(raw, namespace) if isinstance(raw, str) else raw  # as get_type_hints does
            except Exception:  # noqa: BLE001
                continue
        return hints


@dataclass(frozen=True)
class ListenerPayload:
    """The typed parameters of one function (a listener or an event declaration)."""

    owner: str
    parameters: tuple[_TypedParameter, ...]

    def _locate(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Iterable[tuple[_TypedParameter, bool, Any]]:
        for param in self.parameters:
            if param.position is not None and param.position < len(args):
                yield param, True, args[param.position]
            elif param.name in kwargs:
                yield param, False, kwargs[param.name]

    def encode(
        self, event_id: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Check each typed argument against its annotation; return the arguments as JSON-ready values."""
        new_args: list[Any] | None = None
        new_kwargs: dict[str, Any] | None = None
        for param, positional, value in self._locate(args, kwargs):
            try:
                encoded = param.adapter.to_json(value)
            except (TypeError, ValueError, msgspec.ValidationError) as exc:
                raise PayloadValidationError(
                    f"cannot emit event {event_id!r}: argument {param.name!r} of {self.owner} is declared as "
                    f"{_describe(param.annotation)}; the emitted {type(value).__qualname__} does not fit: "
                    f"{_error_text(exc)}"
                ) from None
            if positional:
                new_args = new_args if new_args is not None else list(args)
                new_args[param.position] = encoded  # type: ignore[index]
            else:
                new_kwargs = new_kwargs if new_kwargs is not None else dict(kwargs)
                new_kwargs[param.name] = encoded
        return (args if new_args is None else tuple(new_args)), (kwargs if new_kwargs is None else new_kwargs)

    def decode(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """In the worker: rebuild each typed argument from its JSON into the annotated type."""
        new_args = list(args)
        new_kwargs = dict(kwargs)
        for param, positional, value in self._locate(args, kwargs):
            try:
                typed = param.adapter.to_python(value)
            except (TypeError, ValueError, msgspec.ValidationError) as exc:
                raise PayloadDecodeError(
                    f"argument {param.name!r} of {self.owner} does not fit {_describe(param.annotation)}: "
                    f"{_error_text(exc)}"
                ) from None
            if positional:
                new_args[param.position] = typed  # type: ignore[index]
            else:
                new_kwargs[param.name] = typed
        return tuple(new_args), new_kwargs


def listener_payload(fn: Callable[..., Any], owner: str, skip: Iterable[str] = ()) -> ListenerPayload | None:
    """The typed parameters of ``fn``, or ``None`` (the common case) when it has none.

    ``skip``: parameters that are not emitted (injected by the worker): never checked or rebuilt.
    """
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    hints = _hints(fn)
    typed: list[_TypedParameter] = []
    position = 0
    for param in params:
        positional = param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD)
        annotation = hints.get(param.name)
        if param.name in skip:
            position += positional
            continue
        if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY) and _structured(
            annotation
        ):
            adapter: _Adapter = (
                _PydanticAdapter(annotation) if _contains_pydantic(annotation) else _MsgspecAdapter(annotation)
            )
            typed.append(_TypedParameter(param.name, position if positional else None, annotation, adapter))
        if positional:
            position += 1
    return ListenerPayload(owner, tuple(typed)) if typed else None


@dataclass(frozen=True)
class EventPayload:
    """Every typed parameter an event's arguments must fit: its listeners' and its declaration's."""

    payloads: tuple[ListenerPayload, ...]

    def encode(
        self, event_id: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        for payload in self.payloads:
            args, kwargs = payload.encode(event_id, args, kwargs)
        return args, kwargs


@dataclass(frozen=True)
class EventDeclaration:
    """An event id as a stable contract: the arguments its emitters send, as a function signature."""

    event_id: str
    signature_of: Callable[..., Any]
    """A function whose parameters (and their annotations) are the event's arguments; never called."""

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(f"{self.event_id!r} is an event declaration: emit it with app.emit({self.event_id!r}, ...)")


def declare_event(event_id: str) -> Callable[[Callable[..., Any]], EventDeclaration]:
    """Declare ``event_id`` and its arguments, for web processes that do not import the listeners.

    ```python
    @declare_event("user_created")
    def user_created(user: User, source: str = "web") -> None: ...

    CeleryEventsConfig(declared_events=[user_created])
    ```

    ``emit`` then checks the arguments of ``user_created`` against this signature (and a ``User``
    value against ``User``) even where no listener of the event is registered; the workers that
    run its listeners are elsewhere.
    """

    validate_event_id(event_id)

    def decorate(fn: Callable[..., Any]) -> EventDeclaration:
        return EventDeclaration(event_id, fn)

    return decorate
