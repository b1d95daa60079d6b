"""The bad-input matrix of the README, at the call site: each input has one defined outcome.

What happens to the same inputs on a real worker (round-trip types, a listener's return value,
a listener past its time limit) is in tests/integration/test_reliability.py.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kombu.serialization import dumps as kombu_dumps
from litestar import Litestar
from litestar.exceptions import ImproperlyConfiguredException

from litestar_celery_events import (
    CeleryEventEmitter,
    CeleryEventsConfig,
    CeleryEventsPlugin,
    EventPayloadError,
    ListenerSignatureError,
    PayloadTooLargeError,
    listener,
)


@listener("anything", "évènement_✓")
def takes_anything(*args: Any, **kwargs: Any) -> None: ...


@listener("strict")
def strict(a: int) -> None: ...


@dataclasses.dataclass
class Point:
    x: int


@pytest.fixture
def emitter(tmp_path: Path) -> Iterator[CeleryEventEmitter]:
    config = CeleryEventsConfig(
        broker_url="redis://127.0.0.1:1/0", data_dir=str(tmp_path), max_payload_bytes=1000, flush_timeout_s=0
    )
    app = Litestar(listeners=[takes_anything, strict], plugins=[CeleryEventsPlugin(config)])
    made = app.event_emitter
    assert isinstance(made, CeleryEventEmitter)
    made.start()
    yield made
    made.stop()


ACCEPTED = {
    "None": None,
    "bytes": b"\x00\xff",
    "datetime": datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc),
    "date": datetime.date(2026, 1, 1),
    "UUID": uuid.uuid4(),
    "Decimal": decimal.Decimal("1.10"),
    "nested": {"a": [1, {"b": (None, True, 1.5)}], "ünïcode": "✓"},
}


@pytest.mark.parametrize("value", ACCEPTED.values(), ids=ACCEPTED.keys())
def test_json_and_kombu_types_are_accepted(emitter: CeleryEventEmitter, value: Any) -> None:
    emission = emitter.prepare("anything", (value,), {"value": value})
    assert emission.args == (value,)


REFUSED: dict[str, tuple[Any, type[Exception], str]] = {
    "dataclass": (Point(1), EventPayloadError, r"tests\.unit\.test_bad_input\.Point is not JSON-serialisable"),
    "set": ({1, 2}, EventPayloadError, "builtins.set"),
    "object": (object(), EventPayloadError, "builtins.object"),
    "tuple dict keys": ({(1, 2): "x"}, EventPayloadError, "keys must be"),
    "over max_payload_bytes": ("x" * 2000, PayloadTooLargeError, "over max_payload_bytes=1000"),
}


@pytest.mark.parametrize(("value", "error", "message"), REFUSED.values(), ids=REFUSED.keys())
def test_unencodable_or_oversized_arguments_raise_at_emit_and_enqueue_nothing(
    emitter: CeleryEventEmitter, value: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        emitter.emit("anything", value=value)
    assert isinstance(error(), TypeError)
    assert emitter.publisher.pending == 0


def test_int_float_bool_and_none_dict_keys_become_strings_as_in_stock_celery(emitter: CeleryEventEmitter) -> None:
    value = {2: "int", 1.5: "float", True: "bool", None: "none", "s": "str"}
    ours = json.loads(emitter.prepare("anything", (value,), {"nested": {"k": value}}).body)
    # What apply_async sends for the same arguments: kombu's JSON serializer, as Celery uses it.
    _, _, stock = kombu_dumps([[value], {"nested": {"k": value}}, {}], serializer="json")
    celerys = json.loads(stock)
    as_strings = {"2": "int", "1.5": "float", "true": "bool", "null": "none", "s": "str"}
    assert ours[:2] == celerys[:2] == [[as_strings], {"nested": {"k": as_strings}}]


@pytest.mark.parametrize("event_id", ["", "e" * 201, "with space", "tab\there", "nul\x00"])
def test_malformed_event_ids_are_refused_at_registration(event_id: str) -> None:
    with pytest.raises(ImproperlyConfiguredException):
        listener(event_id)


@pytest.mark.parametrize("event_id", ["", "never_registered", "with space"])
def test_emitting_an_event_id_without_listeners_raises_litestars_error(
    emitter: CeleryEventEmitter, event_id: str
) -> None:
    with pytest.raises(ImproperlyConfiguredException, match="no event listeners are registered"):
        emitter.emit(event_id)


def test_non_ascii_event_ids_are_emitted_under_their_own_task_name(emitter: CeleryEventEmitter) -> None:
    assert emitter.prepare("évènement_✓", (), {}).task_name == "events.évènement_✓"


def test_arguments_a_listener_cannot_take_raise_at_emit_naming_listener_and_argument(
    emitter: CeleryEventEmitter,
) -> None:
    with pytest.raises(
        ListenerSignatureError, match=r"test_bad_input\.strict got unexpected keyword argument\(s\) \['b'\]"
    ):
        emitter.emit("strict", a=1, b=2)
    with pytest.raises(ListenerSignatureError, match=r"missing required argument\(s\) \['a'\]"):
        emitter.emit("strict")
    assert emitter.publisher.pending == 0
