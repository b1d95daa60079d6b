"""Publishing from the web app's event loop, on a real private redis-server.

In an async app on a plain Redis broker the loop writes the events itself; the publisher thread
takes over for what the loop does not publish (a delayed event), after a failure (the server
killed, a reply overdue) and at shutdown, and gives publishing back afterwards. Each test checks
the outcome in Redis: every event there, in emit order, in the envelope the thread writes.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from litestar import Litestar

from litestar_celery_events import CeleryEventsConfig, CeleryEventsPlugin, emit_later, listener
from litestar_celery_events.emitter import CeleryEventEmitter
from litestar_celery_events.publisher import on_loop
from litestar_celery_events.transports.redis import RedisTransport
from tests.helpers import free_port
from tests.redis_servers import RedisProcesses, _base

pytestmark = pytest.mark.integration

QUEUE = "loop-publishing"


@listener("loop_event")
def on_loop_event(n: int) -> None:
    pass


class Server:
    """A redis-server of this test's own, which the test may kill and start again on the same port."""

    def __init__(self, servers: RedisProcesses, folder: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._servers, self._folder = servers, folder
        self.start()

    def start(self) -> None:
        self.proc = self._servers.start(_base(self.port), self._folder, self.port)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def events(self) -> list[dict[str, Any]]:
        """The queue's messages in the order a worker takes them (kombu LPUSHes, BRPOP takes the tail)."""
        return [json.loads(raw) for raw in reversed(self.client().lrange(QUEUE, 0, -1))]


@pytest.fixture
def server(redis_servers: RedisProcesses, tmp_path: Path) -> Iterator[Server]:
    srv = Server(redis_servers, tmp_path)
    yield srv
    if srv.proc.poll() is None:
        srv.kill()


def _app(url: str, tmp_path: Path, **config: Any) -> Litestar:
    settings = CeleryEventsConfig(broker_url=url, default_queue=QUEUE, data_dir=str(tmp_path / "data"), **config)
    return Litestar(listeners=[on_loop_event], plugins=[CeleryEventsPlugin(settings)])


def _numbers(events: list[dict[str, Any]]) -> list[int]:
    return [json.loads(base64.b64decode(event["body"]))[1]["n"] for event in events]


async def _until(condition: Any, timeout_s: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        if loop.time() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.01)


@pytest.fixture
def thread_writes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many payloads the publisher thread wrote (its ``RedisTransport._send``)."""
    writes: list[int] = []
    send = RedisTransport._send

    def counted(self: RedisTransport, client: Any, payload: bytes, replies: int) -> None:
        writes.append(replies)
        send(self, client, payload, replies)

    monkeypatch.setattr(RedisTransport, "_send", counted)
    return writes


def test_the_loop_publishes_in_order_in_the_envelope_the_thread_writes(
    server: Server, tmp_path: Path, thread_writes: list[int]
) -> None:
    async def main() -> None:
        app = _app(server.url, tmp_path)
        async with app.event_emitter as emitter:
            assert isinstance(emitter, CeleryEventEmitter)
            assert emitter.publisher.on_loop
            for n in range(300):
                app.emit("loop_event", n=n)
                if n % 7 == 0:
                    await asyncio.sleep(0)  # several loop iterations: several writes
            await _until(lambda: emitter.publisher.published == 300)
            assert emitter.publisher.on_loop
        assert thread_writes == []  # the loop wrote every one

        threaded = _app(server.url, tmp_path, publish_on_event_loop=False)
        async with threaded.event_emitter as emitter:
            assert not emitter.publisher.on_loop
            threaded.emit("loop_event", n=300)
            await _until(lambda: emitter.publisher.published == 1)
        assert thread_writes

    asyncio.run(main())
    events = server.events()
    assert _numbers(events) == list(range(301))
    from_loop, from_thread = events[0], events[-1]
    for envelope in (from_loop, from_thread):
        for name in ("id", "root_id", "emitted_at", "kwargsrepr"):
            envelope["headers"].pop(name)
        for name in ("correlation_id", "delivery_tag"):
            envelope["properties"].pop(name)
        envelope.pop("body")
    assert from_loop == from_thread


def test_a_killed_server_hands_publishing_to_the_thread_and_no_event_is_lost(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(on_loop, "LOOP_RESUME_AFTER_S", 0.5)

    async def main() -> None:
        app = _app(server.url, tmp_path)
        async with app.event_emitter as emitter:
            for n in range(100):
                app.emit("loop_event", n=n)
                await asyncio.sleep(0)
            await _until(lambda: emitter.publisher.published == 100)
            server.kill()
            for n in range(100, 200):
                app.emit("loop_event", n=n)
                await asyncio.sleep(0.002)
            await _until(lambda: not emitter.publisher.on_loop)
            server.start()
            await _until(lambda: emitter.publisher.waiting == 0)
            await _until(lambda: emitter.publisher.on_loop)  # given back once the thread's buffer is empty
            for n in range(200, 250):
                app.emit("loop_event", n=n)
            await _until(lambda: emitter.publisher.waiting == 0)
            assert emitter.publisher.on_loop

    warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("litestar_celery_events.publisher")
    logger.addHandler(handler)  # Litestar's logging config may keep records from the root logger
    try:
        asyncio.run(main())
    finally:
        logger.removeHandler(handler)
    assert any("the publisher thread takes over" in message for message in warnings)
    delivered = _numbers(server.events())
    # Killed with the first 100 published: they went with the server (no persistence), the rest arrive.
    assert set(range(100, 250)) <= set(delivered)
    assert sorted(set(n for n in delivered if n >= 200)) == [n for n in delivered if n >= 200]


def test_a_delayed_event_goes_through_the_thread_and_the_order_holds(server: Server, tmp_path: Path) -> None:
    async def main() -> None:
        app = _app(server.url, tmp_path)
        async with app.event_emitter as emitter:
            for n in range(20):
                app.emit("loop_event", n=n)
                if n == 9:
                    emit_later(app, "loop_event", n=-1, delay=3600)
            await _until(lambda: emitter.publisher.waiting == 0)
            await _until(lambda: emitter.publisher.on_loop)
            assert emitter.publisher.published == 21

    asyncio.run(main())
    assert _numbers(server.events()) == list(range(20))
    assert sum(server.client().zcard(key) for key in server.client().keys("*") if server.client().type(key) == b"zset")


def test_a_reply_overdue_hands_over_and_shutdown_waits_for_owed_replies(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(on_loop, "LOOP_RESUME_AFTER_S", 0.2)
    celery_config = {"broker_transport_options": {"socket_timeout": 1.0}}

    async def main() -> None:
        app = _app(server.url, tmp_path, celery_config=celery_config)
        async with app.event_emitter as emitter:
            server.client().execute_command("CLIENT", "PAUSE", "2500", "WRITE")  # writes wait, unanswered
            for n in range(50):
                app.emit("loop_event", n=n)
            await _until(lambda: not emitter.publisher.on_loop, timeout_s=5)  # overdue after 1 s
            await _until(lambda: emitter.publisher.waiting == 0)
            await _until(lambda: emitter.publisher.on_loop)
            server.client().execute_command("CLIENT", "PAUSE", "800", "WRITE")
            for n in range(50, 80):
                app.emit("loop_event", n=n)
            await asyncio.sleep(0.05)
            assert emitter.publisher.waiting  # written, owed their replies when shutdown starts
        assert emitter.stop() == 0  # __aexit__ stopped it: nothing left over

    asyncio.run(main())
    assert set(_numbers(server.events())) == set(range(80))


def test_emits_from_other_threads_reach_the_loop(server: Server, tmp_path: Path, thread_writes: list[int]) -> None:
    async def main() -> None:
        app = _app(server.url, tmp_path)
        async with app.event_emitter as emitter:

            def sync_handler(start: int) -> None:
                for n in range(start, start + 25):
                    app.emit("loop_event", n=n)

            threads = [threading.Thread(target=sync_handler, args=(k * 25,)) for k in range(4)]
            for thread in threads:
                thread.start()
            while any(thread.is_alive() for thread in threads):
                await asyncio.sleep(0.005)
            await _until(lambda: emitter.publisher.published == 100)
            assert emitter.publisher.on_loop
            assert emitter.publisher.emitted == 100

    asyncio.run(main())
    assert thread_writes == []
    assert sorted(_numbers(server.events())) == list(range(100))


def test_write_now_writes_at_once_when_no_write_awaits_its_reply(server: Server, tmp_path: Path) -> None:
    """The outbox's hand-over after a commit: written before the loop's next iteration, unless a write is
    in flight (then the next iteration writes it with the rest, as any emit)."""

    async def main() -> None:
        app = _app(server.url, tmp_path)
        async with app.event_emitter as emitter:
            assert isinstance(emitter, CeleryEventEmitter)
            publisher = emitter.publisher
            app.emit("loop_event", n=0)
            await _until(lambda: publisher.published == 1)  # the loop's connection is open
            app.emit("loop_event", n=1)
            assert publisher.pending == 1  # an emit waits for the loop's next iteration
            publisher.write_now()
            assert publisher.pending == 0  # written already, its reply owed
            app.emit("loop_event", n=2)
            publisher.write_now()
            assert publisher.pending == 1  # n=1's reply has not come (this code holds the loop)
            await _until(lambda: publisher.published == 3)

    asyncio.run(main())
    assert _numbers(server.events()) == [0, 1, 2]
