"""The listener decorator and the registry ``event_id -> listeners`` both sides build from the app.

A registry entry keeps the *original* listener function: Litestar's ``EventListener.fn`` wraps it
in a handler that logs and swallows exceptions, so calling that could never trigger a retry.
"""

from __future__ import annotations

import inspect
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from litestar.events import EventListener
from litestar.exceptions import ImproperlyConfiguredException

from litestar_celery_events.contract.events import validate_event_id
from litestar_celery_events.contract.injection import Injection, as_provider, injection_of
from litestar_celery_events.contract.payloads import EventPayload, ListenerPayload, listener_payload
from litestar_celery_events.errors import ListenerSignatureError

if TYPE_CHECKING:
    from litestar.di import Provide

    from litestar_celery_events.config import CeleryEventsConfig
    from litestar_celery_events.contract.payloads import EventDeclaration

__all__ = (
    "CELERY_TASK_OPTIONS",
    "ROUTED_TASK_OPTIONS",
    "CeleryEventListener",
    "ListenerRegistry",
    "ListenerSpec",
    "listener",
    "original_function",
)

logger = logging.getLogger("litestar_celery_events")

RETRY_TASK_OPTIONS = frozenset(
    {"max_retries", "default_retry_delay", "retry_backoff", "retry_backoff_max", "retry_jitter", "autoretry_for"}
)
ROUTED_TASK_OPTIONS = frozenset({"queue", "rate_limit", "time_limit", "soft_time_limit", "priority"})
"""Options that only a task of its own can honour: such a listener runs as a separate task."""
CELERY_TASK_OPTIONS = RETRY_TASK_OPTIONS | ROUTED_TASK_OPTIONS | {"acks_late", "reject_on_worker_lost"}
MAX_REMEMBERED_SHAPES = 4096
"""Argument shapes (event, positional count, keyword names) known to fit, kept by ``check_arguments``."""


class CeleryEventListener(EventListener):
    """``litestar.events.listener`` plus Celery task options; register it with ``Litestar(listeners=...)``."""

    __slots__ = ("celery_options", "dependencies", "original_fn")

    def __init__(
        self,
        *event_ids: str,
        dependencies: Mapping[str, Provide | Callable[..., Any]] | None = None,
        **celery_options: Any,
    ) -> None:
        for event_id in event_ids:
            validate_event_id(event_id)
        unknown = set(celery_options) - CELERY_TASK_OPTIONS
        if unknown:
            raise ImproperlyConfiguredException(
                f"unknown listener option(s) {sorted(unknown)}; supported Celery options: {sorted(CELERY_TASK_OPTIONS)}"
            )
        if "autoretry_for" in celery_options:
            celery_options["autoretry_for"] = tuple(celery_options["autoretry_for"])
        super().__init__(*event_ids)
        self.celery_options: dict[str, Any] = celery_options
        self.dependencies: dict[str, Provide] = {key: as_provider(value) for key, value in (dependencies or {}).items()}
        """Listener-level providers, as a route handler's ``dependencies=``; they override the app's."""

    def __call__(self, fn: Callable[..., Any]) -> CeleryEventListener:
        super().__call__(fn)
        self.original_fn = fn
        return self


listener = CeleryEventListener


def original_function(event_listener: EventListener) -> Callable[..., Any]:
    """The user's function behind an ``EventListener`` (ours or Litestar's own decorator)."""
    original = getattr(event_listener, "original_fn", None)
    if original is not None:
        return original  # type: ignore[no-any-return]
    wrapped = event_listener.fn
    # Litestar: fn = wrap_in_error_handler(ensure_async_callable(user_fn)); recover user_fn.
    freevars = wrapped.__code__.co_freevars
    if wrapped.__closure__ and "fn" in freevars:
        inner = wrapped.__closure__[freevars.index("fn")].cell_contents
        return getattr(inner, "func", inner)  # type: ignore[no-any-return]
    return wrapped


def unprovided_message(listener_name: str, parameters: Iterable[str]) -> str:
    names = ", ".join(repr(p) for p in parameters)
    return (
        f"listener {listener_name} asks for dependency {names}, which no layer provides: add it to the app's "
        "dependencies (Litestar(dependencies={...})) or the listener's (listener(..., dependencies={...}))"
    )


def _listener_name(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


@dataclass(frozen=True)
class ArgumentCheck:
    """What a function accepts, precomputed so checking an emit costs about a microsecond."""

    positional_names: tuple[str, ...]
    positional_max: int | None
    keyword_names: frozenset[str]
    required_names: frozenset[str]
    var_keyword: bool

    @classmethod
    def of(cls, fn: Callable[..., Any], injected: frozenset[str] = frozenset()) -> ArgumentCheck:
        """The check of the emitted parameters of ``fn``: ``injected`` ones are never emitted."""
        every = list(inspect.signature(fn).parameters.values())
        params = [p for p in every if p.name not in injected]
        positional = []
        for p in every:  # emitted positional arguments fill the slots before the first injected one
            if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) or p.name in injected:
                break
            positional.append(p)
        open_ended = any(p.kind is p.VAR_POSITIONAL for p in params) and len(positional) == sum(
            p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in every
        )
        return cls(
            positional_names=tuple(p.name for p in positional),
            positional_max=None if open_ended else len(positional),
            keyword_names=frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)),
            required_names=frozenset(
                p.name for p in params if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            ),
            var_keyword=any(p.kind is p.VAR_KEYWORD for p in params),
        )

    def problem(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str | None:
        """``None`` if ``fn(*args, **kwargs)`` binds, else what is wrong."""
        n = len(args)
        if self.positional_max is not None and n > self.positional_max:
            return f"takes at most {self.positional_max} positional argument(s), {n} given"
        if not self.var_keyword and not kwargs.keys() <= self.keyword_names:
            unexpected = sorted(kwargs.keys() - self.keyword_names)
            return f"got unexpected keyword argument(s) {unexpected} (add **kwargs to accept them)"
        filled = self.positional_names[:n]
        if filled and not kwargs.keys().isdisjoint(filled):
            return f"got multiple values for {sorted(kwargs.keys() & set(filled))}"
        if not self.required_names <= kwargs.keys():
            missing = self.required_names - kwargs.keys() - set(filled)
            if missing:
                return f"missing required argument(s) {sorted(missing)}"
        return None


@dataclass(frozen=True)
class ListenerSpec:
    """One listener, normalised once at registration."""

    name: str
    fn: Callable[..., Any]
    event_ids: frozenset[str]
    is_async: bool
    task_options: Mapping[str, Any]
    """Celery task options: the listener's own, else the config's default retry policy."""
    check: ArgumentCheck
    payload: ListenerPayload | None = None
    """Parameters annotated with a dataclass, msgspec Struct or pydantic model (``None``: none)."""
    injection: Injection = field(default_factory=Injection)
    """Parameters the worker injects (dependencies, ``app``, ``state``): never emitted."""
    dependencies: Mapping[str, Provide] = field(default_factory=dict)
    """The listener's own providers (``listener(..., dependencies={...})``)."""

    @property
    def runs_as_own_task(self) -> bool:
        """Routed listeners (own queue, rate limit, time limit) always run as a task of their own."""
        return bool(ROUTED_TASK_OPTIONS & self.task_options.keys())

    def argument_problem(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str | None:
        return self.check.problem(args, kwargs)


@dataclass
class ListenerRegistry:
    """``event_id -> listeners``, built from a Litestar app's registered listeners."""

    by_event: dict[str, tuple[ListenerSpec, ...]] = field(default_factory=dict)
    by_name: dict[str, ListenerSpec] = field(default_factory=dict)
    declared: dict[str, ListenerSpec] = field(default_factory=dict)
    """Declared events (``declare_event``): checked at ``emit``, never run."""
    payloads: dict[str, EventPayload] = field(default_factory=dict)
    """Only events with typed parameters (listeners' or declared): emit converts just those."""
    unresolved: dict[str, str] = field(default_factory=dict)
    """``event_id -> error``: a listener of the event asks for a dependency no layer provides."""
    fitting_shapes: set[tuple[Any, ...]] = field(default_factory=set, repr=False, compare=False)
    """``(event_id, len(args), *kwargs)`` of emits every listener of the event accepted."""

    @classmethod
    def build(
        cls,
        listeners: Iterable[EventListener],
        config: CeleryEventsConfig,
        app_dependencies: Mapping[str, Any] | None = None,
    ) -> ListenerRegistry:
        """``app_dependencies``: the app's ``dependencies`` (names only matter here)."""
        unresolved: dict[str, str] = {}
        grouped: defaultdict[str, list[ListenerSpec]] = defaultdict(list)
        by_name: dict[str, ListenerSpec] = {}
        for event_listener in listeners:
            fn = original_function(event_listener)
            name = _listener_name(fn)
            if name in by_name:
                if by_name[name].fn is fn:
                    continue
                raise ImproperlyConfiguredException(f"two different listeners are both named {name!r}")
            for event_id in event_listener.event_ids:
                validate_event_id(event_id)
            own = dict(getattr(event_listener, "celery_options", {}))
            # A listener's own options override the config's default retry policy, key by key.
            options = {**config.default_retry.as_task_options(), **own}
            dependencies: dict[str, Provide] = dict(getattr(event_listener, "dependencies", None) or {})
            injection = injection_of(fn, {**(app_dependencies or {}), **dependencies}, f"listener {name}")
            skipped = injection.names | set(injection.unprovided)
            spec = ListenerSpec(
                name=name,
                fn=fn,
                event_ids=event_listener.event_ids,
                is_async=inspect.iscoroutinefunction(fn),
                task_options=options,
                check=ArgumentCheck.of(fn, skipped),
                payload=listener_payload(fn, f"listener {name}", skip=skipped),
                injection=injection,
                dependencies=dependencies,
            )
            if injection.unprovided:
                problem = unprovided_message(name, injection.unprovided)
                for event_id in spec.event_ids:
                    unresolved[event_id] = problem
            by_name[name] = spec
            for event_id in sorted(spec.event_ids):
                grouped[event_id].append(spec)
        registry = cls({event_id: tuple(specs) for event_id, specs in grouped.items()}, by_name, unresolved=unresolved)
        registry.add_declarations(config.declared_events)
        registry.warn_incompatible()
        return registry

    def add_declarations(self, declarations: Iterable[EventDeclaration]) -> None:
        """Add declared events and work out which events have typed payloads (once, at start-up)."""
        for declaration in declarations:
            event_id = validate_event_id(declaration.event_id)
            fn = declaration.signature_of
            name = f"declaration of {event_id!r} ({_listener_name(fn)})"
            self.declared[event_id] = ListenerSpec(
                name=name,
                fn=fn,
                event_ids=frozenset({event_id}),
                is_async=False,
                task_options={},
                check=ArgumentCheck.of(fn),
                payload=listener_payload(fn, name),
            )
        for event_id in {*self.by_event, *self.declared}:
            specs = (*self.declared_for(event_id), *self.by_event.get(event_id, ()))
            typed = tuple(spec.payload for spec in specs if spec.payload is not None)
            if typed:
                self.payloads[event_id] = EventPayload(typed)

    def declared_for(self, event_id: str) -> tuple[ListenerSpec, ...]:
        spec = self.declared.get(event_id)
        return () if spec is None else (spec,)

    def get(self, event_id: str) -> tuple[ListenerSpec, ...]:
        """The event's listeners (and its declaration, if any) whose signatures ``emit`` checks."""
        if self.declared and event_id in self.declared:
            return (*self.declared_for(event_id), *self.by_event.get(event_id, ()))
        try:
            return self.by_event[event_id]
        except KeyError:
            raise ImproperlyConfiguredException(f"no event listeners are registered for event ID: {event_id}") from None

    def check_arguments(
        self, event_id: str, specs: Iterable[ListenerSpec], args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> None:
        """Raise ``ListenerSignatureError`` unless every spec (the event's own) accepts the arguments."""
        # Only the number of positional arguments and the keyword names matter: remember the shapes
        # that fit, so a call site that emits the same shape again costs one set lookup.
        shape = (event_id, len(args), *kwargs)
        if shape in self.fitting_shapes:
            return
        for spec in specs:
            problem = spec.check.problem(args, kwargs)
            if problem is not None:
                raise ListenerSignatureError(f"cannot emit event {event_id!r}: listener {spec.name} {problem}")
        if len(self.fitting_shapes) >= MAX_REMEMBERED_SHAPES:
            self.fitting_shapes.clear()
        self.fitting_shapes.add(shape)

    def warn_incompatible(self) -> None:
        """Warn when one listener names an argument another listener of the same event cannot take."""
        for event_id, specs in self.by_event.items():
            for spec in specs:
                if spec.check.var_keyword:
                    continue
                others = set().union(*(s.check.required_names for s in specs if s is not spec))
                extra = others - spec.check.keyword_names
                if extra:
                    logger.warning(
                        "listener %s of event %r does not accept %s that other listeners of the event require; "
                        "add **kwargs to it (see Litestar's events docs)",
                        spec.name,
                        event_id,
                        sorted(extra),
                    )
