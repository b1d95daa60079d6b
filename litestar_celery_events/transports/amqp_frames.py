"""AMQP 0-9-1 ``basic.publish`` frames for a task message: the bytes py-amqp writes for kombu's
``Producer.publish``, built without its generic per-field serializer and sent a batch at a time.

py-amqp serialises every header through a chain of ``isinstance`` checks and writes each message
with its own ``sendall``: about four times the CPU per message. A unit test holds these frames
byte-equal to what ``KombuTransport._publish_one`` sends through py-amqp.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from struct import Struct
from typing import Any

from amqp.serialization import dumps

__all__ = ("publish_frames",)

_FRAME_END = b"\xce"
_FRAME_HEAD = Struct(">BHI")  # type, channel, size
_CONTENT_HEAD = Struct(">HHQH")  # class (basic), weight, body size, property flags
_U32 = Struct(">I")
_I32 = Struct(">i")
_I64 = Struct(">q")
_F64 = Struct(">d")
_BASIC_PUBLISH = b"\x00\x3c\x00\x28"  # class 60, method 40
# content_type, content_encoding, headers, delivery_mode, priority, correlation_id, reply_to
_PROPERTY_FLAGS = 0xFE00
_PRIORITY_FLAG = 0x0800


def _shortstr(value: str) -> bytes:
    raw = value.encode("utf-8", "surrogatepass")
    if len(raw) > 255:
        raise ValueError(f"AMQP short string over 255 bytes: {value[:40]!r}...")
    return bytes((len(raw),)) + raw


def _str(value: str) -> bytes:
    raw = value.encode("utf-8", "surrogatepass")
    return b"S" + _U32.pack(len(raw)) + raw


def _int(value: int) -> bytes:
    return b"L" + _I64.pack(value) if value > 2147483647 or value < -2147483647 else b"I" + _I32.pack(value)


def _array(values: list[Any] | tuple[Any, ...]) -> bytes:
    data = b"".join([_item(v) for v in values])
    return b"A" + _U32.pack(len(data)) + data


_ENCODERS: dict[type, Callable[[Any], bytes]] = {
    str: _str,
    type(None): lambda _: b"V",
    bool: lambda value: b"t\x01" if value else b"t\x00",
    float: lambda value: b"d" + _F64.pack(value),
    int: _int,
    dict: lambda value: b"F" + _table(value),
    list: _array,
    tuple: _array,
}


def _item(value: Any) -> bytes:
    """One field value, as ``amqp.serialization._write_item`` writes it (the types task headers hold)."""
    encode = _ENCODERS.get(type(value))
    if encode is None:  # anything else: py-amqp's own encoding (a table of one field, unwrapped)
        return dumps("F", [{"": value}])[5:]  # type: ignore[no-any-return]
    return encode(value)


_KEYS: dict[str, bytes] = {}
"""Encoded header names: a task message's are the same few every time."""


def _table(table: dict[str, Any]) -> bytes:
    parts: list[bytes] = []
    append = parts.append
    keys = _KEYS
    for key, value in table.items():
        encoded_key = keys.get(key)
        if encoded_key is None:
            encoded_key = _shortstr(key)
            if len(keys) < 1024:
                keys[key] = encoded_key
        append(encoded_key)
        if type(value) is str:  # most header values: inline, the commonest case
            raw = value.encode("utf-8", "surrogatepass")
            append(b"S" + _U32.pack(len(raw)) + raw)
        elif value is None:
            append(b"V")
        else:
            append(_item(value))
    data = b"".join(parts)
    return _U32.pack(len(data)) + data


@lru_cache(maxsize=256)
def _method_frame_payload(exchange: str, routing_key: str) -> bytes:
    args: bytes = dumps("Bssbb", (0, exchange, routing_key, False, False))
    return _BASIC_PUBLISH + args


@lru_cache(maxsize=16)
def _fixed_properties(content_type: str, content_encoding: str) -> bytes:
    return _shortstr(content_type) + _shortstr(content_encoding)


def publish_frames(
    channel_id: int,
    frame_max: int,
    *,
    exchange: str,
    routing_key: str,
    body: bytes,
    headers: dict[str, Any],
    content_type: str,
    content_encoding: str,
    correlation_id: str,
    priority: int | None = 0,
    delivery_mode: int = 2,
) -> bytes:
    """The method, header and body frames of one persistent message with kombu's properties."""
    method = _method_frame_payload(exchange, routing_key)
    properties = (
        _fixed_properties(content_type, content_encoding)
        + _table(headers)
        + (bytes((delivery_mode,)) if priority is None else bytes((delivery_mode, priority)))
        + _shortstr(correlation_id)
        + b"\x00"  # reply_to: "" (Celery sends it empty, not absent)
    )
    flags = _PROPERTY_FLAGS if priority is not None else _PROPERTY_FLAGS & ~_PRIORITY_FLAG
    header = _CONTENT_HEAD.pack(60, 0, len(body), flags) + properties
    out = [
        _FRAME_HEAD.pack(1, channel_id, len(method)),
        method,
        _FRAME_END,
        _FRAME_HEAD.pack(2, channel_id, len(header)),
        header,
        _FRAME_END,
    ]
    chunk = frame_max - 8
    for start in range(0, len(body), chunk):
        part = body[start : start + chunk]
        out += [_FRAME_HEAD.pack(3, channel_id, len(part)), part, _FRAME_END]
    return b"".join(out)
