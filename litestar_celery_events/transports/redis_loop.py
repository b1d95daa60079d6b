"""One non-blocking connection to the broker's Redis on the web app's own event loop.

The publisher writes its ``LPUSH`` payloads here while the broker answers, so an ``emit`` in an
async handler costs no second thread and no hand-off of the GIL. Only the replies those writes
produce are understood (``+OK``, ``:<n>``, ``-<error>``): anything else ends the connection.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ("LoopConnection", "LoopEndpoint", "ReplyError", "open_loop_connection", "resp_command")


@dataclass(frozen=True)
class LoopEndpoint:
    """A plain TCP (``host``/``port``) or unix-socket (``path``) Redis and how to log in."""

    host: str | None
    port: int
    path: str | None
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)  # never in a repr or a log
    db: int = 0
    timeout_s: float = 10.0


class ReplyError(Exception):
    """Redis answered a command with an error."""


def resp_command(*parts: str | bytes) -> bytes:
    """One command in Redis's wire protocol."""
    encoded = [part.encode() if isinstance(part, str) else part for part in parts]
    return b"*%d\r\n" % len(encoded) + b"".join(b"$%d\r\n%b\r\n" % (len(part), part) for part in encoded)


class LoopConnection(asyncio.Protocol):
    """Counts the replies to what was written; reports the first error or the loss of the connection."""

    def __init__(self, on_reply: Callable[[], None], on_lost: Callable[[BaseException], None]) -> None:
        self._on_reply = on_reply
        self._on_lost = on_lost
        self._transport: asyncio.Transport | None = None
        self._partial = b""
        self._login_replies = 0
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # a stream transport

    def login(self, endpoint: LoopEndpoint) -> None:
        """``AUTH`` and ``SELECT`` as the server needs them, before anything else is written."""
        commands = []
        if endpoint.password is not None:
            credentials = [endpoint.username, endpoint.password] if endpoint.username else [endpoint.password]
            commands.append(resp_command("AUTH", *credentials))
        if endpoint.db:
            commands.append(resp_command("SELECT", str(endpoint.db)))
        if commands:
            self._login_replies = len(commands)
            self.write(b"".join(commands))

    def write(self, payload: bytes) -> None:
        if self._transport is None or self.closed:
            raise ConnectionError("the event loop's Redis connection is closed")
        self._transport.write(payload)

    def data_received(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\r\n")
        self._partial = lines.pop()
        for line in lines:
            kind = line[:1]
            if kind == b"-":
                self.fail(ReplyError(line[1:].decode(errors="replace")))
                return
            if kind not in (b":", b"+"):
                self.fail(ReplyError(f"unexpected reply from Redis: {line[:40]!r}"))
                return
            if self._login_replies:
                self._login_replies -= 1
            else:
                self._on_reply()

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(exc or ConnectionError("Redis closed the event loop's connection"))

    def close(self) -> None:
        """Close without reporting a loss (shutdown)."""
        self.closed = True
        if self._transport is not None:
            self._transport.abort()

    def fail(self, exc: BaseException) -> None:
        """Close now (replies still owed are not waited for) and report ``exc`` once."""
        if self.closed:
            return
        self.closed = True
        if self._transport is not None:
            self._transport.abort()
        self._on_lost(exc)


async def open_loop_connection(
    endpoint: LoopEndpoint, on_reply: Callable[[], None], on_lost: Callable[[BaseException], None]
) -> LoopConnection:
    loop = asyncio.get_running_loop()
    connection = LoopConnection(on_reply, on_lost)
    if endpoint.path is not None:
        opening = loop.create_unix_connection(lambda: connection, endpoint.path)
    else:
        opening = loop.create_connection(lambda: connection, endpoint.host or "localhost", endpoint.port)
    await asyncio.wait_for(opening, endpoint.timeout_s)
    connection.login(endpoint)
    return connection
