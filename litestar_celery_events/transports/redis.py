"""Publishes straight to Redis in kombu's own message format: one round trip per batch.

kombu's Redis transport builds a client object and makes a round trip per publish; this writes
the very same JSON envelope (``LPUSH`` onto the queue's list, as kombu does) for a whole batch
in one payload, so stock Celery workers and Flower read the messages unchanged.
"""

from __future__ import annotations

import binascii
import inspect
import json
from dataclasses import replace
from typing import TYPE_CHECKING

import redis

from litestar_celery_events.brokers import redis_settings
from litestar_celery_events.contract.message import (
    CONTENT_ENCODING,
    CONTENT_TYPE,
    EMITTED_AT_HEADER,
    EVENT_HEADER,
    Emission,
    short_repr,
    task_headers,
)
from litestar_celery_events.stores.schedule import due_timestamp, stage_delayed
from litestar_celery_events.transports.base import origin_nodename

if TYPE_CHECKING:
    from celery import Celery

__all__ = ("RedisTransport", "lpush_commands", "redis_envelope")


_quote = json.encoder.encode_basestring_ascii
# The envelope of an emission without extra headers, filled by %-formatting: the same JSON as
# ``_generic_envelope`` (a unit test holds them equal) in a fifth of the time.
_TEMPLATE = (
    '{"body":"%s","content-encoding":' + _quote(CONTENT_ENCODING) + ',"content-type":' + _quote(CONTENT_TYPE) + ","
    '"headers":{"lang":"py","task":%s,"id":%s,"shadow":null,"eta":%s,"expires":null,"group":null,'
    '"group_index":null,"retries":%d,"timelimit":[null,null],"root_id":%s,"parent_id":null,"argsrepr":%s,'
    '"kwargsrepr":%s,"origin":%s,"ignore_result":true,"stamped_headers":null,"stamps":{},'
    '"' + EVENT_HEADER + '":%s,"' + EMITTED_AT_HEADER + '":%r},'
    '"properties":{"correlation_id":%s,"reply_to":"","delivery_mode":2,'
    '"delivery_info":{"exchange":"","routing_key":%s},"priority":0,"body_encoding":"base64","delivery_tag":%s}}'
)


def redis_envelope(emission: Emission, queue: str, origin: str, delivery_tag: str) -> str:
    """The JSON kombu's Redis transport stores for one Celery task message."""
    if emission.listeners is not None or emission.extra_headers or type(emission.emitted_at) is not float:
        return _generic_envelope(emission, queue, origin, delivery_tag)
    quoted_id = _quote(emission.emission_id)
    return _TEMPLATE % (
        binascii.b2a_base64(emission.body, newline=False).decode(),
        _quote(emission.task_name),
        quoted_id,
        "null" if emission.eta is None else _quote(emission.eta),
        emission.retries,
        quoted_id,
        _quote(short_repr(emission.args)),
        _quote(short_repr(emission.kwargs)),
        _quote(origin),
        _quote(emission.event_id),
        emission.emitted_at,
        quoted_id,
        _quote(queue),
        _quote(delivery_tag),
    )


def _generic_envelope(emission: Emission, queue: str, origin: str, delivery_tag: str) -> str:
    return json.dumps(
        {
            "body": binascii.b2a_base64(emission.body, newline=False).decode(),
            "content-encoding": CONTENT_ENCODING,
            "content-type": CONTENT_TYPE,
            "headers": task_headers(emission, origin),
            "properties": {
                "correlation_id": emission.emission_id,
                "reply_to": "",
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": queue},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": delivery_tag,
            },
        },
        separators=(",", ":"),
    )


def lpush_commands(runs: list[tuple[str, list[str]]]) -> bytes:
    """``LPUSH key v1 v2 ...`` per run, in Redis's wire protocol (RESP), as one payload.

    ``LPUSH k a b c`` equals ``LPUSH k a; LPUSH k b; LPUSH k c``: the worker's BRPOP takes them in order.
    """
    out: list[bytes] = []
    for key, values in runs:
        encoded_key = key.encode()
        out.append(b"*%d\r\n$5\r\nLPUSH\r\n$%d\r\n%b\r\n" % (len(values) + 2, len(encoded_key), encoded_key))
        for value in values:
            encoded = value.encode()
            out.append(b"$%d\r\n%b\r\n" % (len(encoded), encoded))
    return b"".join(out)


# redis-py < 5.3 wants a command name for ``get_connection``; later versions deprecate passing one.
_command_name = inspect.signature(redis.ConnectionPool.get_connection).parameters.get("command_name")
_POOL_WANTS_COMMAND_NAME = _command_name is not None and _command_name.default is inspect.Parameter.empty


class RedisTransport:
    """Pipelined ``LPUSH`` of kombu-format messages (priority 0, kombu's default)."""

    def __init__(self, celery_app: Celery) -> None:
        settings = redis_settings(celery_app)  # TLS, Sentinel, failover, timeouts: as kombu connects
        self._redis = settings.open()
        self._key_prefix: str = settings.global_keyprefix
        self._default_queue: str = celery_app.conf.task_default_queue
        self._origin = origin_nodename()
        self._sent = 0

    def key_of(self, queue: str | None) -> str:
        """The Redis list a queue lives in (kombu: the queue name, after any global key prefix)."""
        return f"{self._key_prefix}{queue or self._default_queue}"

    def publish(self, batch: list[Emission], done: list[int]) -> None:
        """Publish ``batch`` in one round trip; ``done[0]`` becomes ``len(batch)`` once Redis acknowledged it."""
        if any(emission.eta is not None for emission in batch):
            self._publish_pipelined(batch, done)
            return
        # The common case: only LPUSHes, written as one RESP payload (redis-py's per-argument packing
        # costs about as much as building the message itself) and sent on a pooled connection.
        runs: list[tuple[str, list[str]]] = []
        run_key = ""
        for emission in batch:
            queue = emission.queue or self._default_queue
            self._sent += 1
            key = self.key_of(queue)
            if key != run_key:
                runs.append((key, []))
                run_key = key
            runs[-1][1].append(redis_envelope(emission, queue, self._origin, f"{emission.emission_id}.{self._sent}"))
        self._send(lpush_commands(runs), replies=len(runs))
        done[0] = len(batch)

    def _send(self, payload: bytes, replies: int) -> None:
        pool = self._redis.client().connection_pool
        connection = pool.get_connection("LPUSH") if _POOL_WANTS_COMMAND_NAME else pool.get_connection()
        try:
            connection.send_packed_command([payload])  # type: ignore[no-untyped-call]  # redis-py: unannotated
            for _ in range(replies):
                connection.read_response()  # raises on an error reply
        except BaseException:
            connection.disconnect()  # type: ignore[no-untyped-call]  # replies may be unread: drop it
            raise
        finally:
            pool.release(connection)

    def _publish_pipelined(self, batch: list[Emission], done: list[int]) -> None:
        pipe = self._redis.client().pipeline(transaction=False)
        run_key = ""
        run: list[str] = []
        for emission in batch:
            queue = emission.queue or self._default_queue
            self._sent += 1
            tag = f"{emission.emission_id}.{self._sent}"
            if emission.eta is not None:  # emit_later: waits in the broker-side store, enqueued when due
                envelope = redis_envelope(replace(emission, eta=None), queue, self._origin, tag)
                stage_delayed(
                    pipe,
                    self._key_prefix,
                    emission.emission_id,
                    due_timestamp(emission.eta),
                    self.key_of(queue),
                    envelope,
                )
                continue
            key = self.key_of(queue)
            if key != run_key:  # one LPUSH per run of messages to the same queue (kombu: one per message)
                if run:
                    pipe.lpush(run_key, *run)
                run_key, run = key, []
            run.append(redis_envelope(emission, queue, self._origin, tag))
        if run:
            # LPUSH k a b c == LPUSH k a; LPUSH k b; LPUSH k c: same order for the worker's BRPOP.
            pipe.lpush(run_key, *run)
        pipe.execute()
        done[0] = len(batch)

    def close(self) -> None:
        self._redis.close()
