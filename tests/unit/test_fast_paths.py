"""The emit and publish fast paths produce exactly what the plain paths would (behaviour only: no timing)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from kombu.utils.json import loads
from litestar import Litestar

from litestar_celery_events import (
    CeleryEventEmitter,
    CeleryEventsConfig,
    CeleryEventsPlugin,
    EmitterNotRunningError,
    EventPayloadError,
    ListenerSignatureError,
    PayloadTooLargeError,
    PayloadValidationError,
    listener,
)
from litestar_celery_events.contract.message import _EMBED, Emission, _encoder, encode_body, new_emission_id
from litestar_celery_events.listeners import ListenerRegistry
from litestar_celery_events.transports.redis import (
    RedisTransport,
    _generic_envelope,
    lpush_commands,
    redis_envelope,
)

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


class RecordingConnection:
    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.replies = 0
        self.disconnected = False

    def send_packed_command(self, chunks: list[bytes]) -> None:
        self.sent.extend(chunks)

    def read_response(self) -> int:
        self.replies += 1
        return 1

    def disconnect(self) -> None:
        self.disconnected = True


class RecordingPool:
    def __init__(self) -> None:
        self.connection = RecordingConnection()
        self.released = 0

    def get_connection(self, *_: str) -> RecordingConnection:
        return self.connection

    def release(self, connection: RecordingConnection) -> None:
        self.released += 1


class RecordingClient:
    def __init__(self) -> None:
        self.connection_pool = RecordingPool()


def _parse_resp_commands(payload: bytes) -> list[list[str]]:
    """The commands in a RESP payload (arrays of bulk strings only)."""
    commands, i = [], 0
    while i < len(payload):
        assert payload[i : i + 1] == b"*"
        end = payload.index(b"\r\n", i)
        count, i = int(payload[i + 1 : end]), end + 2
        args = []
        for _ in range(count):
            end = payload.index(b"\r\n", i)
            length, i = int(payload[i + 1 : end]), end + 2
            args.append(payload[i : i + length].decode())
            i += length + 2
        commands.append(args)
    return commands


def test_a_batch_goes_out_as_one_lpush_per_run_of_the_same_queue_in_one_payload() -> None:
    app = Celery(set_as_current=False)
    app.conf.broker_url = "redis://127.0.0.1:1/0"
    transport = RedisTransport(app)
    client = RecordingClient()
    transport._redis_handle.client = lambda: client  # type: ignore[method-assign,assignment,return-value]
    transport._sized_client = client  # type: ignore[assignment]  # its size limit: Redis's default
    queues = ["a", "a", "b", None, None, "a"]
    batch = [
        Emission.create("e", "events.e", (), {"n": n}, max_payload_bytes=1000, queue=q) for n, q in enumerate(queues)
    ]
    done = [0]
    transport.publish(batch, done)
    assert done == [len(batch)]
    connection = client.connection_pool.connection
    assert len(connection.sent) == 1, "one payload, one round trip"
    commands = _parse_resp_commands(connection.sent[0])
    assert [(c[0], c[1], len(c) - 2) for c in commands] == [
        ("LPUSH", "a", 2),
        ("LPUSH", "b", 1),
        ("LPUSH", "celery", 2),
        ("LPUSH", "a", 1),
    ]
    assert connection.replies == 4
    assert client.connection_pool.released == 1
    sent = [json.loads(v)["headers"]["id"] for c in commands for v in c[2:]]
    assert sent == [e.emission_id for e in batch]


def test_a_failed_send_drops_the_connection_and_reports_nothing_done() -> None:
    app = Celery(set_as_current=False)
    app.conf.broker_url = "redis://127.0.0.1:1/0"
    transport = RedisTransport(app)
    client = RecordingClient()
    connection = client.connection_pool.connection

    def broken(chunks: list[bytes]) -> None:
        raise ConnectionError("reset")

    connection.send_packed_command = broken  # type: ignore[method-assign]
    transport._redis_handle.client = lambda: client  # type: ignore[method-assign,assignment,return-value]
    transport._sized_client = client  # type: ignore[assignment]  # its size limit: Redis's default
    done = [0]
    with pytest.raises(ConnectionError):
        transport.publish([Emission.create("e", "events.e", (), {}, max_payload_bytes=1000)], done)
    assert done == [0]
    assert connection.disconnected
    assert client.connection_pool.released == 1


def test_non_ascii_queue_names_are_counted_in_bytes() -> None:
    payload = lpush_commands([("qé", ["x"])])
    assert _parse_resp_commands(payload) == [["LPUSH", "qé", "x"]]


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


@dataclasses.dataclass
class _Profile:
    name: str


def _typed(profile: _Profile) -> None: ...


def test_emits_after_the_first_of_an_event_skip_only_the_checks_that_event_already_passed(tmp_path: Path) -> None:
    app = Litestar(
        listeners=[listener("e")(_fn), listener("typed")(_typed)],
        plugins=[CeleryEventsPlugin(CeleryEventsConfig(data_dir=str(tmp_path), max_payload_bytes=1000))],
    )
    emitter = app.event_emitter
    assert isinstance(emitter, CeleryEventEmitter)
    emitter._running = True  # prepare only: nothing is published
    first = emitter.prepare("e", (), {"email": "a", "n": 1})
    second = emitter.prepare("e", (), {"email": "a", "n": 1})
    assert "e" in emitter._plain_events
    assert (second.event_id, second.task_name, second.body, second.queue, second.eta) == (
        first.event_id,
        first.task_name,
        first.body,
        first.queue,
        first.eta,
    )
    assert second.emission_id != first.emission_id
    with pytest.raises(ListenerSignatureError, match="missing required argument"):
        emitter.prepare("e", (), {"n": 1})
    with pytest.raises(EventPayloadError, match="not JSON-serialisable"):
        emitter.prepare("e", (), {"email": object(), "n": 1})
    with pytest.raises(PayloadTooLargeError):
        emitter.prepare("e", (), {"email": "x" * 2000, "n": 1})
    # A typed payload is checked on every emit, never remembered.
    emitter.prepare("typed", (_Profile("a"),), {})
    assert "typed" not in emitter._plain_events
    with pytest.raises(PayloadValidationError):
        emitter.prepare("typed", ({"name": 1},), {})
    emitter._running = False
    with pytest.raises(EmitterNotRunningError):
        emitter.prepare("e", (), {"email": "a", "n": 1})
