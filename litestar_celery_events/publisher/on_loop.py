"""The publisher's event-loop side: in an async web app, the app's own loop writes events to Redis.

While the broker answers, ``emit`` on the loop appends to the buffer and schedules one callback
per loop iteration that writes everything buffered as one ``LPUSH`` payload on a non-blocking
connection (``transports.redis_loop``): no second thread, no GIL hand-off. Anything else (an event
with a delay or one only kombu delivers, a failed write, a reply that does not come in time,
shutdown) hands the buffer to the publisher thread, which has the retries, the spool and the
failover; the thread gives it back once its buffer is empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING, Any

from litestar_celery_events.brokers import redact_url
from litestar_celery_events.publisher.spooling import SPOOL_WHEN_STALLED_S
from litestar_celery_events.transports.redis import (
    MIN_LINK_BYTES_PER_S,
    RedisTransport,
    loop_endpoint,
    lpush_commands,
)
from litestar_celery_events.transports.redis_loop import LoopConnection, open_loop_connection

if TYPE_CHECKING:
    from collections.abc import Callable

    from litestar_celery_events.batches import BatchSizer
    from litestar_celery_events.contract.message import Emission
    from litestar_celery_events.stores.spool import Spool
    from litestar_celery_events.transports import Transport
    from litestar_celery_events.transports.redis_loop import LoopEndpoint
    from litestar_celery_events.transports.routing import Destination

__all__ = ("LoopPublishing",)

logger = logging.getLogger("litestar_celery_events.publisher")

LOOP_BATCHES_IN_FLIGHT = 4
"""Writes awaiting their replies at once; more events wait in the buffer (bounded as always)."""
LOOP_RESUME_AFTER_S = 5.0
"""After a failure on the loop's connection the thread publishes for at least this long."""
LOOP_MAX_MESSAGE_BYTES = 1_000_000
"""Redis accepts a message this big whatever its limits are set to (their minimum is 1 MB); a
bigger one goes through the thread, which knows the server's actual limit."""


@dataclass(slots=True)
class _Written:
    emissions: list[Emission]
    replies_left: int
    overdue: asyncio.TimerHandle


class LoopPublishing:
    """Mixed into ``Publisher``: publishing from the web app's event loop while the broker answers."""

    # Defined by Publisher.
    _buffer: deque[Emission]
    _batches: BatchSizer
    _transport: Transport
    _wakeup: threading.Event
    _idle: bool
    _broker: str
    published: int
    spool: Spool | None
    _report_published: Callable[[list[Emission]], None]

    def _init_loop_state(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._endpoint: LoopEndpoint | None = None
        self._on_loop = False  # True: the loop drains the buffer, the thread waits
        self._flush_scheduled = False
        self._connection: LoopConnection | None = None
        self._connecting = False
        self._loop_taking: list[Emission] = []  # being encoded: neither in the buffer nor written
        self._loop_written: deque[_Written] = deque()
        self._resume_after = 0.0

    @property
    def on_loop(self) -> bool:
        """Whether the event loop publishes now (else the publisher thread does)."""
        return self._on_loop

    def publish_on_loop(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Publish from ``loop`` (running in the calling thread) while the broker answers; ``False``
        when the broker is not a plain Redis this loop can reach (the thread publishes, as before)."""
        endpoint = loop_endpoint(self._transport)
        if endpoint is None:
            return False
        self._loop, self._loop_thread, self._endpoint = loop, threading.get_ident(), endpoint
        self._on_loop = True
        return True

    def _wake_drainer(self) -> None:
        """A new event is in the buffer: wake whichever of the loop and the thread drains it."""
        if self._on_loop:
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self._call_on_loop(self._flush_on_loop)
        elif self._idle:
            self._wakeup.set()

    def write_now(self) -> None:
        """Write what is buffered now instead of at the loop's next iteration, when called on the loop's
        thread with no write awaiting its reply (the outbox, right after a commit: the rest of the request
        runs before the next iteration). Under load a write is in flight: its reply writes the rest, batched."""
        if self._on_loop and not self._loop_written and self._buffer and threading.get_ident() == self._loop_thread:
            self._flush_on_loop()

    def _call_on_loop(self, callback: Callable[[], Any]) -> None:
        loop = self._loop
        try:
            if loop is None:
                raise RuntimeError("no event loop")
            if threading.get_ident() == self._loop_thread:
                loop.call_soon(callback)
            else:
                loop.call_soon_threadsafe(callback)
        except RuntimeError:  # the loop is closed: the thread publishes from now on
            self._loop = None
            self._on_loop = False
            self._flush_scheduled = False
            self._wakeup.set()

    def _flush_on_loop(self) -> None:
        """Write what is buffered (runs on the loop, once per iteration that emitted)."""
        self._flush_scheduled = False
        if not self._on_loop:
            return
        connection = self._connection
        if connection is None or connection.closed:
            if not self._connecting and self._loop is not None:
                self._connecting = True
                self._loop.create_task(self._connect())
            return
        transport = self._transport
        if not isinstance(transport, RedisTransport):  # replaced since (a test's scripted transport)
            self._loop = None
            self._hand_to_thread(None)
            return
        buffer = self._buffer
        while buffer and len(self._loop_written) < LOOP_BATCHES_IN_FLIGHT:
            size = self._batches.fitting(len(emission.body) for emission in islice(buffer, self._batches.cap))
            batch = self._loop_taking = []
            destinations: list[Destination] = []
            leftover = False
            for _ in range(size):
                emission = buffer[0]
                destination = self._loop_destination(emission)
                if destination is None:
                    leftover = True
                    break
                batch.append(emission)  # then out of the buffer: always in one of the two
                buffer.popleft()
                destinations.append(destination)
            runs, count, _ = transport.lpush_runs(batch, destinations, LOOP_MAX_MESSAGE_BYTES)
            if count < len(batch):
                buffer.extendleft(reversed(batch[count:]))
                del batch[count:]
                leftover = True
            if batch and not self._write(connection, batch, runs):
                return
            self._loop_taking = []
            if leftover:  # what only the thread publishes is next: it takes over, in order
                self._hand_to_thread(None)
                return

    def _loop_destination(self, emission: Emission) -> Destination | None:
        """Where ``emission`` goes if the loop can publish it (a plain ``LPUSH``), else ``None``."""
        if emission.eta is not None:
            return None
        try:
            destination = self._transport.route(emission)  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - a router that refuses it: the thread records why
            return None
        return destination if destination.redis_key is not None else None

    def _write(self, connection: LoopConnection, batch: list[Emission], runs: list[tuple[str, list[str]]]) -> bool:
        payload = lpush_commands(runs)
        assert self._loop is not None and self._endpoint is not None
        timeout_s = self._endpoint.timeout_s + len(payload) / MIN_LINK_BYTES_PER_S
        if self.spool is not None:  # as the thread: a broker that hangs this long sends events to the spool
            timeout_s = min(timeout_s, SPOOL_WHEN_STALLED_S)
        overdue = self._loop.call_later(timeout_s, self._reply_overdue)
        self._loop_written.append(_Written(batch, len(runs), overdue))
        try:
            connection.write(payload)
        except ConnectionError as exc:
            self._hand_to_thread(exc)
            return False
        return True

    async def _connect(self) -> None:
        assert self._endpoint is not None
        try:
            self._connection = await open_loop_connection(self._endpoint, self._on_reply, self._on_lost)
        except (OSError, asyncio.TimeoutError) as exc:
            self._hand_to_thread(exc)
            return
        finally:
            self._connecting = False
        self._flush_on_loop()

    def _on_reply(self) -> None:
        written = self._loop_written[0]
        written.replies_left -= 1
        if written.replies_left:
            return
        self._loop_written.popleft()
        written.overdue.cancel()
        self.published += len(written.emissions)
        self._report_published(written.emissions)
        if self._buffer and not self._flush_scheduled and self._on_loop:
            self._flush_scheduled = True
            self._flush_on_loop()

    def _reply_overdue(self) -> None:
        connection = self._connection
        if connection is not None:
            connection.fail(TimeoutError(f"no reply from {self._broker} in time"))

    def _on_lost(self, exc: BaseException) -> None:
        self._hand_to_thread(exc)

    def _hand_to_thread(self, exc: BaseException | None) -> None:
        """The thread publishes from here on. After a failure (``exc``) the writes still owed a reply
        go back to the head of the buffer: Redis may have taken some (at-least-once, as a retry)."""
        self._on_loop = False
        if exc is not None:
            self._resume_after = time.monotonic() + LOOP_RESUME_AFTER_S
            connection, self._connection = self._connection, None
            if connection is not None:
                connection.fail(exc)
            owed = [emission for written in self._loop_written for emission in written.emissions]
            for written in self._loop_written:
                written.overdue.cancel()
            self._loop_written.clear()
            self._buffer.extendleft(reversed(owed))
            logger.warning(
                "publishing from the event loop to %s stopped (%s: %s); the publisher thread takes over %d event(s)",
                self._broker,
                type(exc).__name__,
                redact_url(str(exc)),
                len(self._buffer),
            )
        self._wakeup.set()

    def _nudge_loop(self) -> None:
        """The thread's periodic check: the loop publishes, events wait, and no flush is coming."""
        if self._on_loop and self._buffer and not self._flush_scheduled:
            self._flush_scheduled = True
            self._call_on_loop(self._flush_on_loop)

    def _maybe_resume_loop(self, failures: int) -> None:
        """The thread, its buffer empty and its last publish a success: give publishing back to the loop."""
        if failures or self._buffer or self._loop is None or self._on_loop or time.monotonic() < self._resume_after:
            return
        self._on_loop = True
        self._flush_scheduled = True
        self._call_on_loop(self._flush_on_loop)  # for what arrived while the thread had it

    def _leave_loop(self) -> asyncio.AbstractEventLoop | None:
        """Shutdown: the thread flushes what is left; writes owed a reply are waited for (on the loop)
        unless shutdown runs on the loop itself, which then cannot read them: they go back."""
        loop, self._loop = self._loop, None
        self._on_loop = False
        if loop is not None and threading.get_ident() == self._loop_thread and self._loop_written:
            self._hand_to_thread(ConnectionAbortedError("the publisher stops on the event loop's own thread"))
        return loop

    def _close_loop_connection(self, loop: asyncio.AbstractEventLoop | None) -> None:
        connection, self._connection = self._connection, None
        if connection is None or loop is None:
            return
        with contextlib.suppress(RuntimeError):  # a closed loop closed its connection
            loop.call_soon_threadsafe(connection.close)

    @property
    def _loop_waiting(self) -> int:
        return len(self._loop_taking) + sum(len(written.emissions) for written in self._loop_written)

    def _loop_unpublished(self) -> list[Emission]:
        owed = [emission for written in self._loop_written for emission in written.emissions]
        for written in self._loop_written:
            written.overdue.cancel()
        self._loop_written.clear()
        return list(self._loop_taking) + owed
