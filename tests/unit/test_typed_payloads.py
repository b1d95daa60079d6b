"""Typed payloads: checked and encoded at emit, rebuilt into the annotated type for the listener."""

from __future__ import annotations

import datetime
import json
from typing import Any

import pytest
from litestar.exceptions import ImproperlyConfiguredException

from litestar_celery_events import (
    CeleryEventsConfig,
    ListenerSignatureError,
    PayloadValidationError,
    declare_event,
    listener,
)
from litestar_celery_events.contract.message import encode_body
from litestar_celery_events.contract.payloads import PayloadDecodeError
from litestar_celery_events.listeners import ListenerRegistry
from litestar_celery_events.runtime.invoke import call_listener
from tests.apps.typed import Invoice, Order, User, archive, count_items, invoice_sent, ship, user_signed_up, welcome

SIGNED_UP_AT = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)


def _registry(*listeners: Any, declared: tuple[Any, ...] = ()) -> ListenerRegistry:
    return ListenerRegistry.build(listeners, CeleryEventsConfig(declared_events=declared))


def _over_the_wire(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """What the worker gets: the emitter's JSON body, decoded."""
    wire_args, wire_kwargs, _ = json.loads(encode_body("e", args, kwargs, 10**6))
    return tuple(wire_args), wire_kwargs


def test_a_dataclass_argument_is_sent_as_json_and_rebuilt_for_the_listener() -> None:
    registry = _registry(welcome)
    args, kwargs = registry.payloads["user_signed_up"].encode(
        "user_signed_up", (), {"user": User("ada@example.com", SIGNED_UP_AT)}
    )
    assert kwargs == {"user": {"email": "ada@example.com", "signed_up_at": "2026-01-02T03:04:05Z"}}
    spec = registry.by_name["tests.apps.typed.welcome"]
    assert spec.payload is not None
    _, decoded = spec.payload.decode(*_over_the_wire(args, kwargs))
    assert decoded["user"] == User("ada@example.com", SIGNED_UP_AT)


def test_a_msgspec_struct_passed_positionally_fits_the_listener_that_names_it() -> None:
    received: list[Any] = []

    @listener("struct_event")
    def on_order(order: Order) -> None:
        received.append(order)

    registry = _registry(on_order)
    args, kwargs = registry.payloads["struct_event"].encode("struct_event", (Order(1, ["tea"]),), {})
    assert args == ({"order_id": 1, "items": ["tea"]},)
    (spec,) = registry.get("struct_event")
    call_listener(spec, *_over_the_wire(args, kwargs))
    assert received == [Order(1, ["tea"])]


def test_a_plain_dict_that_fits_the_annotation_is_accepted() -> None:
    registry = _registry(welcome)
    _, kwargs = registry.payloads["user_signed_up"].encode(
        "user_signed_up", (), {"user": {"email": "a@b.c", "signed_up_at": "2026-01-02T03:04:05Z"}}
    )
    assert kwargs["user"]["email"] == "a@b.c"


@pytest.mark.parametrize(
    ("value", "detail"),
    [
        pytest.param(
            {"email": 3, "signed_up_at": "2026-01-02T03:04:05Z"},
            "Expected `str`, got `int` - at `$.email`",
            id="wrong-field-type",
        ),
        pytest.param({"email": "a@b.c"}, "missing required field `signed_up_at`", id="missing-field"),
        pytest.param("ada@example.com", "the emitted str does not fit", id="not-an-object"),
        pytest.param(Order(1, []), "missing required field", id="another-struct"),
    ],
)
def test_a_value_that_does_not_fit_fails_at_the_call_site_naming_event_argument_and_listener(
    value: Any, detail: str
) -> None:
    registry = _registry(welcome)
    with pytest.raises(PayloadValidationError) as raised:
        registry.payloads["user_signed_up"].encode("user_signed_up", (), {"user": value})
    message = str(raised.value)
    assert "cannot emit event 'user_signed_up'" in message
    assert "argument 'user' of listener tests.apps.typed.welcome is declared as User" in message
    assert detail in message
    assert isinstance(raised.value, TypeError)


def test_a_pydantic_model_is_validated_with_pydantic() -> None:
    registry = _registry(archive)
    _, kwargs = registry.payloads["invoice_sent"].encode(
        "invoice_sent", (), {"invoice": Invoice(number="A1", total_cents=5)}
    )
    assert kwargs == {"invoice": {"number": "A1", "total_cents": 5}}
    with pytest.raises(PayloadValidationError, match="greater than 0 at total_cents"):
        registry.payloads["invoice_sent"].encode("invoice_sent", (), {"invoice": {"number": "A1", "total_cents": -5}})
    spec = registry.by_name["tests.apps.typed.archive"]
    assert spec.payload is not None
    assert spec.payload.decode((), kwargs)[1]["invoice"] == Invoice(number="A1", total_cents=5)


def test_listeners_without_typed_parameters_add_no_work_to_emit() -> None:
    registry = _registry(count_items)
    assert registry.payloads == {}
    assert registry.by_name["tests.apps.typed.count_items"].payload is None


def test_an_untyped_sibling_listener_gets_plain_json_while_the_typed_one_gets_its_struct() -> None:
    registry = _registry(ship, count_items)
    assert list(registry.payloads) == ["order_placed"]
    _, kwargs = registry.payloads["order_placed"].encode(
        "order_placed", (), {"order": Order(2, ["a"]), "order_id": 2, "items": ["a"]}
    )
    assert kwargs["order"] == {"order_id": 2, "items": ["a"]}


def test_json_that_no_longer_fits_is_a_decode_error_in_the_worker() -> None:
    spec = _registry(welcome).by_name["tests.apps.typed.welcome"]
    assert spec.payload is not None
    with pytest.raises(PayloadDecodeError, match=r"argument 'user' of listener tests\.apps\.typed\.welcome"):
        spec.payload.decode((), {"user": {"email": "a@b.c"}})


def test_a_declared_event_is_checked_at_emit_where_no_listener_is_registered() -> None:
    registry = _registry(declared=(user_signed_up, invoice_sent))
    (declaration,) = registry.get("user_signed_up")
    assert "declaration of 'user_signed_up'" in declaration.name
    registry.check_arguments("user_signed_up", registry.get("user_signed_up"), (), {"user": {}})
    with pytest.raises(ListenerSignatureError, match="unexpected keyword argument"):
        registry.check_arguments("user_signed_up", registry.get("user_signed_up"), (), {"user": {}, "admin": True})
    with pytest.raises(PayloadValidationError, match="argument 'user' of declaration of 'user_signed_up'"):
        registry.payloads["user_signed_up"].encode("user_signed_up", (), {"user": {"email": 1}})
    with pytest.raises(ImproperlyConfiguredException):
        registry.get("order_placed")
    assert registry.by_event == {}, "declared events register no task in a worker"


def test_a_declaration_is_not_a_function_to_call() -> None:
    with pytest.raises(TypeError, match="event declaration"):
        user_signed_up(user=None)
    with pytest.raises(ImproperlyConfiguredException):
        declare_event("has space")
