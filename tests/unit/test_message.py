from __future__ import annotations

import datetime as dt
import json
import uuid
from dataclasses import dataclass
from decimal import Decimal

import pytest
from kombu.utils.json import loads

from litestar_celery_events import EventPayloadError, PayloadTooLargeError
from litestar_celery_events.contract.message import Emission, encode_body, new_emission_id, task_headers


def test_body_is_celerys_protocol_v2_triple() -> None:
    body = json.loads(encode_body("e", (1, "a"), {"k": None}, 10_000))
    assert body == [[1, "a"], {"k": None}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]


def test_kombu_types_round_trip_through_the_workers_decoder() -> None:
    values = {
        "when": dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc),
        "day": dt.date(2026, 1, 2),
        "id": uuid.UUID(int=5),
        "amount": Decimal("1.10"),
        "raw": b"\x00\xff",
        "nested": {"list": [1, {"deep": None}]},
    }
    args, kwargs, _ = loads(encode_body("e", (), values, 10_000))
    assert args == []
    assert kwargs == values


def test_unencodable_values_raise_a_type_error_naming_the_event_and_the_type() -> None:
    @dataclass
    class Point:
        x: int

    with pytest.raises(TypeError, match=r"cannot emit event 'moved'.*test_message\..*Point"):
        encode_body("moved", (Point(1),), {}, 10_000)
    with pytest.raises(EventPayloadError, match="'moved'"):
        encode_body("moved", (), {"s": {1, 2}}, 10_000)


def test_payload_over_the_limit_is_refused_with_its_size() -> None:
    with pytest.raises(PayloadTooLargeError, match=r"over max_payload_bytes=100"):
        encode_body("big", ("x" * 200,), {}, 100)


def test_emission_ids_are_unique_and_uuid_shaped() -> None:
    ids = {new_emission_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    for emission_id in list(ids)[:10]:
        uuid.UUID(emission_id)


def test_headers_carry_the_task_name_emission_id_and_our_metadata() -> None:
    emission = Emission.create("user_created", "events.user_created", (), {"email": "a"}, max_payload_bytes=1000)
    headers = task_headers(emission, "gen1@host")
    assert headers["task"] == "events.user_created"
    assert headers["id"] == headers["root_id"] == emission.emission_id
    assert headers["event_id"] == "user_created"
    assert headers["kwargsrepr"] == "{'email': 'a'}"
    assert "listeners" not in headers
