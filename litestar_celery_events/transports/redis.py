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
from typing import TYPE_CHECKING, Any

import redis

from litestar_celery_events.brokers import SOCKET_TIMEOUT_S, redis_settings
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
from litestar_celery_events.transports.base import MessageRefused, origin_nodename
from litestar_celery_events.transports.redis_loop import LoopEndpoint
from litestar_celery_events.transports.routing import EventRouter, route_all

if TYPE_CHECKING:
    from collections.abc import Mapping

    from celery import Celery

    from litestar_celery_events.transports.kombu import KombuTransport
    from litestar_celery_events.transports.routing import Destination, Route

__all__ = ("RedisTransport", "loop_endpoint", "lpush_commands", "redis_envelope")

MIN_LINK_BYTES_PER_S = 1_000_000
"""A write gets ``SOCKET_TIMEOUT_S`` plus the time its payload takes at this rate (a slow link)."""
DEFAULT_MAX_BULK_BYTES = 512 * 1024 * 1024
"""Redis's default ``proto-max-bulk-len``: the largest single message it accepts."""


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
    '"delivery_info":{"exchange":"","routing_key":%s},"priority":%s,"body_encoding":"base64","delivery_tag":%s}}'
)


def redis_envelope(emission: Emission, queue: str, origin: str, delivery_tag: str, priority: object = None) -> str:
    """The JSON kombu's Redis transport stores for one Celery task message sent to ``queue``.

    ``priority``: the message's priority property as kombu writes it (``None`` becomes 0).
    """
    priority = priority or 0
    if (
        emission.listeners is not None
        or emission.extra_headers
        or type(emission.emitted_at) is not float
        or type(priority) is not int
    ):
        return _generic_envelope(emission, queue, origin, delivery_tag, priority)
    key = (emission.task_name, emission.event_id, queue, priority, origin)
    chunks = _templates.get(key)
    if chunks is None:
        chunks = _templates[key] = _template_for(*key)
    quoted_id = _quote(emission.emission_id)
    c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10 = chunks
    return "".join(
        (
            c0,
            binascii.b2a_base64(emission.body, newline=False).decode(),
            c1,
            quoted_id,
            c2,
            "null" if emission.eta is None else _quote(emission.eta),
            c3,
            str(emission.retries),
            c4,
            quoted_id,
            c5,
            _quote(short_repr(emission.args)),
            c6,
            _quote(short_repr(emission.kwargs)),
            c7,
            repr(emission.emitted_at),
            c8,
            quoted_id,
            c9,
            _quote(delivery_tag),
            c10,
        )
    )


_templates: dict[tuple[str, str, str, int, str], list[str]] = {}


def _template_for(task_name: str, event_id: str, queue: str, priority: int, origin: str) -> list[str]:
    """``_TEMPLATE`` with what is the same for every message of one task to one queue filled in, cut
    where the per-message values go (joining the parts is about twice as fast as %-formatting)."""
    if len(_templates) >= 4096:  # names come from the app's own events: this only bounds a misuse
        _templates.clear()
    fixed = {
        "task": _quote(task_name),
        "origin": _quote(origin),
        "event": _quote(event_id),
        "queue": _quote(queue),
        "priority": str(priority),
    }
    cut = "\x00"  # never in JSON text: control characters are escaped
    filled = _TEMPLATE.replace("%d", "%s").replace("%r", "%s") % (
        cut,
        fixed["task"],
        cut,
        cut,
        cut,
        cut,
        cut,
        cut,
        fixed["origin"],
        fixed["event"],
        cut,
        cut,
        fixed["queue"],
        fixed["priority"],
        cut,
    )
    return filled.split(cut)


def _generic_envelope(emission: Emission, queue: str, origin: str, delivery_tag: str, priority: object = 0) -> str:
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
                "priority": priority,
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
    """Pipelined ``LPUSH`` of kombu-format messages onto the lists kombu's Redis transport would use.

    Destinations come from the Celery app's router (``transports.routing``); a message only kombu
    can deliver (an exchange that fans out) goes through ``KombuTransport`` instead, in order.
    """

    def __init__(self, celery_app: Celery, task_options: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        settings = redis_settings(celery_app)  # TLS, Sentinel, failover, timeouts: as kombu connects
        self._app = celery_app
        self._redis_handle = settings.open()
        self._key_prefix: str = settings.global_keyprefix
        self.route: Route = EventRouter(celery_app, task_options, redis=True)
        self._origin = origin_nodename()
        self._kombu: KombuTransport | None = None
        self._sized_client: redis.Redis | None = None
        self._max_message_bytes = DEFAULT_MAX_BULK_BYTES
        self._sent = 0

    def _redis(self) -> redis.Redis:
        """The factory's client (a new one after a fork or a failover), with that server's size limit known."""
        client = self._redis_handle.client()
        if client is not self._sized_client:
            self._max_message_bytes = _max_message_bytes(client)
            self._sized_client = client
        return client

    def publish(self, batch: list[Emission], done: list[int]) -> None:
        """Publish ``batch`` in order; ``done[0]`` counts the messages Redis (or kombu) acknowledged."""
        destinations, unroutable = route_all(self.route, batch)
        start = 0
        for index, destination in enumerate(destinations):
            if destination.redis_key is None:  # only kombu can deliver it: what precedes goes first
                self._publish_run(batch, destinations, start, index, done)
                self._kombu_transport().publish_one(batch[index], destination)
                done[0] += 1
                start = index + 1
        self._publish_run(batch, destinations, start, len(destinations), done)
        if unroutable is not None:
            raise unroutable

    def _kombu_transport(self) -> KombuTransport:
        if self._kombu is None:
            from litestar_celery_events.transports.kombu import KombuTransport

            self._kombu = KombuTransport(self._app, route=self.route)
        return self._kombu

    def _publish_run(
        self, batch: list[Emission], destinations: list[Destination], start: int, stop: int, done: list[int]
    ) -> None:
        if start >= stop:
            return
        whole = start == 0 and stop == len(batch)
        emissions = batch if whole else batch[start:stop]
        routed = destinations if whole else destinations[start:stop]
        client = self._redis()  # connects: the broker's size limit is known from here on
        if any(emission.eta is not None for emission in emissions):
            self._publish_pipelined(client, emissions, routed, done)
            return
        # The common case: only LPUSHes, written as one RESP payload (redis-py's per-argument packing
        # costs about as much as building the message itself) and sent on a pooled connection.
        runs, count, refused = self.lpush_runs(emissions, routed, self._max_message_bytes)
        if runs:
            self._send(client, lpush_commands(runs), replies=len(runs))
            done[0] += count
        if refused is not None:
            raise MessageRefused(f"{refused} (proto-max-bulk-len / client-query-buffer-limit)")

    def lpush_runs(
        self, emissions: list[Emission], routed: list[Destination], limit: int
    ) -> tuple[list[tuple[str, list[str]]], int, str | None]:
        """The envelopes of the leading ``emissions`` as runs of ``LPUSH`` per list, how many that is,
        and why the next one stopped the batch (over ``limit`` bytes), if one did."""
        runs: list[tuple[str, list[str]]] = []
        run_key = ""
        count = 0
        for emission, destination in zip(emissions, routed, strict=True):
            self._sent += 1
            envelope = redis_envelope(
                emission,
                destination.routing_key,
                self._origin,
                f"{emission.emission_id}.{self._sent}",
                destination.priority,
            )
            if len(envelope) > limit:  # ASCII JSON: characters are bytes
                return (
                    runs,
                    count,
                    f"the message is {len(envelope)} bytes, over this Redis server's limit of {limit} bytes",
                )
            key = destination.redis_key or ""
            if key != run_key:
                runs.append((key, []))
                run_key = key
            runs[-1][1].append(envelope)
            count += 1
        return runs, count, None

    def _send(self, client: redis.Redis, payload: bytes, replies: int) -> None:
        pool = client.connection_pool
        connection = pool.get_connection("LPUSH") if _POOL_WANTS_COMMAND_NAME else pool.get_connection()
        sock = getattr(connection, "_sock", None)
        usual_s = getattr(connection, "socket_timeout", None) or SOCKET_TIMEOUT_S
        try:
            if sock is not None:  # a big payload may take a while on a slow link: give it time to match
                sock.settimeout(write_timeout_s(len(payload), usual_s))
            connection.send_packed_command([payload])  # type: ignore[no-untyped-call]  # redis-py: unannotated
            for _ in range(replies):
                connection.read_response()  # raises on an error reply
            if sock is not None:
                sock.settimeout(usual_s)
        except BaseException:
            connection.disconnect()  # type: ignore[no-untyped-call]  # replies may be unread: drop it
            raise
        finally:
            pool.release(connection)

    def _publish_pipelined(
        self, client: redis.Redis, batch: list[Emission], routed: list[Destination], done: list[int]
    ) -> None:
        pipe = client.pipeline(transaction=False)
        run_key = ""
        run: list[str] = []
        for emission, destination in zip(batch, routed, strict=True):
            self._sent += 1
            tag = f"{emission.emission_id}.{self._sent}"
            key = destination.redis_key or ""
            if emission.eta is not None:  # emit_later: waits in the broker-side store, enqueued when due
                envelope = redis_envelope(
                    replace(emission, eta=None), destination.routing_key, self._origin, tag, destination.priority
                )
                stage_delayed(pipe, self._key_prefix, emission.emission_id, due_timestamp(emission.eta), key, envelope)
                continue
            if key != run_key:  # one LPUSH per run of messages to the same list (kombu: one per message)
                if run:
                    pipe.lpush(run_key, *run)
                run_key, run = key, []
            run.append(redis_envelope(emission, destination.routing_key, self._origin, tag, destination.priority))
        if run:
            # LPUSH k a b c == LPUSH k a; LPUSH k b; LPUSH k c: same order for the worker's BRPOP.
            pipe.lpush(run_key, *run)
        pipe.execute()
        done[0] += len(batch)

    def reachable(self) -> bool:
        try:
            return bool(self._redis().ping())
        except Exception:  # noqa: BLE001 - any failure means "not reachable now"
            self.close()
            return False

    def close(self) -> None:
        self._redis_handle.close()
        self._sized_client = None
        if self._kombu is not None:
            self._kombu.close()


def write_timeout_s(payload_bytes: int, usual_s: float = SOCKET_TIMEOUT_S) -> float:
    """Socket timeout of one write: the usual one plus the time the payload takes at ``MIN_LINK_BYTES_PER_S``."""
    return usual_s + payload_bytes / MIN_LINK_BYTES_PER_S


def _max_message_bytes(client: redis.Redis) -> int:
    """The largest message this server accepts (``CONFIG GET`` may be refused: then Redis's defaults)."""
    try:
        config = client.config_get("proto-max-bulk-len")
        config.update(client.config_get("client-query-buffer-limit"))
        limits = [
            int(str(config[name])) for name in ("proto-max-bulk-len", "client-query-buffer-limit") if name in config
        ]
    except redis.ResponseError:  # CONFIG is often disabled on managed Redis
        return DEFAULT_MAX_BULK_BYTES
    return min(limits, default=DEFAULT_MAX_BULK_BYTES)


def loop_endpoint(transport: object) -> LoopEndpoint | None:
    """Where the web app's event loop can publish ``transport``'s messages itself, or ``None``: only a
    plain TCP or unix-socket Redis (no TLS, no Sentinel, no credential provider) qualifies."""
    if not isinstance(transport, RedisTransport):
        return None
    handle = transport._redis_handle
    if handle.sentinel:
        return None
    pool = handle.client().connection_pool
    kwargs = pool.connection_kwargs
    if issubclass(pool.connection_class, redis.SSLConnection) or kwargs.get("credential_provider") is not None:
        return None
    unix = issubclass(pool.connection_class, redis.UnixDomainSocketConnection)
    return LoopEndpoint(
        host=None if unix else str(kwargs.get("host") or "localhost"),
        port=int(kwargs.get("port") or 6379),
        path=str(kwargs["path"]) if unix else None,
        username=kwargs.get("username"),
        password=kwargs.get("password"),
        db=int(kwargs.get("db") or 0),
        timeout_s=float(kwargs.get("socket_timeout") or SOCKET_TIMEOUT_S),
    )
