from __future__ import annotations

import logging
from typing import Any

import pytest
from litestar.events import listener as litestar_listener
from litestar.exceptions import ImproperlyConfiguredException

from litestar_celery_events import CeleryEventsConfig, ListenerSignatureError, RetryPolicy, listener
from litestar_celery_events.listeners import ArgumentCheck, ListenerRegistry, original_function


async def async_fn(email: str) -> None: ...


def sync_fn(email: str) -> None: ...


def test_original_function_is_recovered_from_litestars_own_decorator() -> None:
    assert original_function(litestar_listener("a")(async_fn)) is async_fn
    assert original_function(litestar_listener("a")(sync_fn)) is sync_fn


def test_our_decorator_keeps_the_function_and_the_celery_options() -> None:
    decorated = listener("a", "b", max_retries=5, queue="mail")(async_fn)
    assert original_function(decorated) is async_fn
    assert decorated.event_ids == frozenset({"a", "b"})
    assert decorated.celery_options == {"max_retries": 5, "queue": "mail"}


def test_unknown_listener_options_are_refused_with_the_supported_list() -> None:
    with pytest.raises(ImproperlyConfiguredException, match="max_retries"):
        listener("a", max_retry=5)


@pytest.mark.parametrize("event_id", ["", "has space", "tab\there", "x" * 201, "new\nline"])
def test_bad_event_ids_are_refused_at_registration(event_id: str) -> None:
    with pytest.raises(ImproperlyConfiguredException):
        listener(event_id)


def test_non_ascii_event_ids_are_accepted() -> None:
    assert listener("utilisateur_créé")(async_fn).event_ids == frozenset({"utilisateur_créé"})


def test_registry_merges_the_default_retry_policy_with_a_listeners_own_options() -> None:
    config = CeleryEventsConfig(default_retry=RetryPolicy(max_retries=7, retry_backoff=False))
    registry = ListenerRegistry.build(
        [litestar_listener("plain")(sync_fn), listener("own", max_retries=1, queue="q")(async_fn)], config
    )
    plain = registry.get("plain")[0]
    own = registry.get("own")[0]
    assert plain.task_options["max_retries"] == 7
    assert plain.is_async is False
    assert not plain.runs_as_own_task
    assert own.task_options["max_retries"] == 1
    assert own.task_options["retry_backoff"] is False  # from the default policy
    assert own.is_async is True
    assert own.runs_as_own_task


def test_registry_raises_litestars_error_for_an_event_without_listeners() -> None:
    registry = ListenerRegistry.build([], CeleryEventsConfig())
    with pytest.raises(ImproperlyConfiguredException, match="no event listeners are registered for event ID: x"):
        registry.get("x")


def test_argument_check_names_the_listener_and_the_unexpected_argument() -> None:
    registry = ListenerRegistry.build([listener("user_deleted")(async_fn)], CeleryEventsConfig())
    specs = registry.get("user_deleted")
    registry.check_arguments("user_deleted", specs, (), {"email": "a"})
    with pytest.raises(ListenerSignatureError, match=r"async_fn got unexpected keyword argument\(s\) \['reason'\]"):
        registry.check_arguments("user_deleted", specs, (), {"email": "a", "reason": "r"})


def _sig(a: int, /, b: int, *args: int, c: int, d: int = 1, **kwargs: Any) -> None: ...
def _strict(a: int, b: int = 2) -> None: ...


@pytest.mark.parametrize(
    ("fn", "args", "kwargs"),
    [
        (_sig, (1, 2), {"c": 3}),
        (_sig, (1,), {"b": 2, "c": 3, "zzz": 4}),
        (_sig, (1, 2, 3, 4), {"c": 1}),
        (_strict, (1,), {}),
        (_strict, (), {"a": 1, "b": 2}),
        (_strict, (1, 2), {}),
        (_strict, (1, 2, 3), {}),
        (_strict, (), {}),
        (_strict, (1,), {"a": 1}),
        (_strict, (), {"x": 1, "a": 1}),
        (_sig, (), {"b": 1, "c": 1}),
        (_sig, (1,), {"b": 1}),
    ],
)
def test_argument_check_agrees_with_python_binding(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    import inspect

    try:
        inspect.signature(fn).bind(*args, **kwargs)
        binds = True
    except TypeError:
        binds = False
    assert (ArgumentCheck.of(fn).problem(args, kwargs) is None) is binds


def test_start_up_warns_about_a_listener_that_cannot_take_what_its_siblings_require(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def farewell(email: str) -> None: ...
    async def support(reason: str, **kwargs: Any) -> None: ...

    with caplog.at_level(logging.WARNING, logger="litestar_celery_events"):
        ListenerRegistry.build(
            [listener("user_deleted")(farewell), listener("user_deleted")(support)], CeleryEventsConfig()
        )
    assert "does not accept ['reason']" in caplog.text
    assert "farewell" in caplog.text
