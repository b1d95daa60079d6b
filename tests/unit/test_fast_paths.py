"""The emit and publish fast paths produce exactly what the plain paths would (behaviour only: no timing)."""

from __future__ import annotations

import datetime as dt
import json
import os
import uuid
from decimal import Decimal
from typing import Any

import pytest
from celery import Celery
from kombu.utils.json import loads

from litestar_celery_events import CeleryEventsConfig, ListenerSignatureError, listener
from litestar_celery_events.listeners import ListenerRegistry
from litestar_celery_events.message import _EMBED, Emission, _encoder, encode_body, new_emission_id
from litestar_celery_events.transports.redis import RedisTransport, _generic_envelope, redis_envelope

PAYLOADS = [
    ((), {}),
    ((1, "a", None, 2.5, True), {"email": "user@example.com", "n": 1}),
    (('é " \\ \n \u2028 😀',), {"k\u00e9y": ["x", {"deep": [1, 2]}]}),
    ((), {"when": dt.datetime(2026, 1, 2, tzinfo=dt.timezone.utc), "id": uuid.UUID(int=7), "d": Decimal("1.1")}),
    ((b"\x00\xff", dt.date(2026, 1, 2)), {"big": "x" * 5000}),
]


@pytest.mark.parametrize(("args", "kwargs"), PAYLOADS)
def test_the_fast_body_encoder_writes_what_the_plain_encoder_writes(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    plain = ("[" + _encoder.encode(args) + "," + _encoder.encode(kwargs) + _EMBED).encode()
    assert encode_body("e", args, kwargs, 10**6) == plain
    assert loads(plain)[:2] == [list(args), kwargs]


def test_a_circular_payload_is_refused_and_the_encoder_keeps_working() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(TypeError, match="cannot emit event 'e'"):
        encode_body("e", (loop,), {}, 10**6)
    assert json.loads(encode_body("e", ([1],), {}, 10**6))[0] == [[1]]


@pytest.mark.parametrize(("args", "kwargs"), PAYLOADS)
@pytest.mark.parametrize("variant", ["plain", "eta_and_retries", "odd_names"])
def test_the_redis_envelope_template_equals_the_generic_envelope(
    args: tuple[Any, ...], kwargs: dict[str, Any], variant: str
) -> None:
    emission = Emission.create("user_created", "events.user_created", args, kwargs, max_payload_bytes=10**6)
    queue, origin, tag = "celery", "gen1@host", f"{emission.emission_id}.1"
    if variant == "eta_and_retries":
        emission.eta, emission.retries = "2026-01-01T00:00:00+00:00", 3
    if variant == "odd_names":
        emission.event_id, emission.task_name = 'ev"é', 'events.ev"é'
        queue, origin, tag = 'q"\\', "gen1@hôst", 't"1'
    assert json.loads(redis_envelope(emission, queue, origin, tag)) == json.loads(
        _generic_envelope(emission, queue, origin, tag)
    )


def test_emissions_with_extra_headers_or_listeners_take_the_generic_envelope() -> None:
    emission = Emission.create("e", "events.e", (), {}, max_payload_bytes=1000)
    emission.listeners = ("mod.fn",)
    emission.extra_headers = {"traceparent": "00-abc-def-01"}
    headers = json.loads(redis_envelope(emission, "celery", "o", "t"))["headers"]
    assert headers["listeners"] == ["mod.fn"]
    assert headers["traceparent"] == "00-abc-def-01"


class RecordingPipeline:
    def __init__(self) -> None:
        self.commands: list[tuple[str, tuple[str, ...]]] = []

    def lpush(self, key: str, *values: str) -> None:
        self.commands.append((key, values))

    def execute(self) -> None:
        pass


class RecordingClient:
    def __init__(self) -> None:
        self.pipe = RecordingPipeline()

    def pipeline(self, transaction: bool) -> RecordingPipeline:
        return self.pipe


def test_a_batch_goes_out_as_one_lpush_per_run_of_the_same_queue_in_order() -> None:
    app = Celery(set_as_current=False)
    app.conf.broker_url = "redis://127.0.0.1:1/0"
    transport = RedisTransport(app)
    client = RecordingClient()
    transport._client = client  # type: ignore[assignment]
    queues = ["a", "a", "b", None, None, "a"]
    batch = [
        Emission.create("e", "events.e", (), {"n": n}, max_payload_bytes=1000, queue=q) for n, q in enumerate(queues)
    ]
    done = [0]
    transport.publish(batch, done)
    assert done == [len(batch)]
    assert [(key, len(values)) for key, values in client.pipe.commands] == [("a", 2), ("b", 1), ("celery", 2), ("a", 1)]
    sent = [json.loads(v)["headers"]["id"] for _, values in client.pipe.commands for v in values]
    assert sent == [e.emission_id for e in batch]


def _fn(email: str, **kwargs: Any) -> None: ...


def test_a_remembered_argument_shape_still_refuses_a_different_shape() -> None:
    registry = ListenerRegistry.build([listener("e")(_fn)], CeleryEventsConfig())
    specs = registry.get("e")
    for _ in range(2):
        registry.check_arguments("e", specs, (), {"email": "a", "extra": 1})
    with pytest.raises(ListenerSignatureError, match="missing required argument"):
        registry.check_arguments("e", specs, (), {"extra": 1})
    with pytest.raises(ListenerSignatureError, match="positional"):
        registry.check_arguments("e", specs, ("a", "b"), {})


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # 3.12+: fork() in a multi-threaded process
def test_a_forked_child_gets_its_own_emission_ids() -> None:
    parent = new_emission_id()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(write, new_emission_id().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 100).decode()
    os.close(read)
    os.close(write)
    assert child[:24] != parent[:24]
    assert new_emission_id()[:24] == parent[:24]
