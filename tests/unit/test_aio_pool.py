"""The asyncio pool on its own (no broker): jobs shaped like the ones Celery's consumer hands it."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import pytest
import redis
from celery.exceptions import SoftTimeLimitExceeded

from litestar_celery_events import CeleryEventsConfig
from litestar_celery_events.celery_app import ASYNC_POOL, build_celery_app
from litestar_celery_events.runtime import invoke
from litestar_celery_events.runtime.acks import MAX_ACK_BATCH, _BatchingAck, _PipelinedReserve
from litestar_celery_events.runtime.aio_pool import AsyncListenerPool, _asked_for_prefork
from litestar_celery_events.runtime.brpop import _EarlyBrpop
from litestar_celery_events.runtime.event_loop import close_loop, run_coroutine


@pytest.fixture
def pool() -> Iterator[AsyncListenerPool]:
    made = AsyncListenerPool(limit=10)
    made.start()
    yield made
    made.stop()
    assert invoke.run_async_listener is run_coroutine, "a stopped pool puts the plain runners back"
    close_loop()


class Outcome:
    """What Celery's request would be told: one callback, maybe timeouts."""

    def __init__(self) -> None:
        self.results: list[Any] = []
        self.timeouts: list[tuple[bool, float]] = []
        self.done = threading.Event()

    def callback(self, result: Any) -> None:
        self.results.append(result)
        self.done.set()

    def timeout_callback(self, soft: bool, seconds: float) -> None:
        self.timeouts.append((soft, seconds))


def _apply(pool: AsyncListenerPool, target: Callable[[], Any], **limits: float) -> Outcome:
    outcome = Outcome()
    pool.apply_async(target, callback=outcome.callback, timeout_callback=outcome.timeout_callback, **limits)
    return outcome


def test_async_listeners_of_many_tasks_run_at_once_up_to_the_limit(pool: AsyncListenerPool) -> None:
    intervals: list[tuple[float, float]] = []

    async def listener() -> str:
        start = time.monotonic()
        await asyncio.sleep(0.3)
        intervals.append((start, time.monotonic()))
        return "ok"

    outcomes = [_apply(pool, lambda: invoke.run_async_listener(listener())) for _ in range(20)]
    for outcome in outcomes:
        assert outcome.done.wait(10)
        assert outcome.results == ["ok"]
    starts = sorted(start for start, _ in intervals)
    first_wave_end = min(end for _, end in intervals)
    assert sum(start < first_wave_end for start in starts) == 10, "ten at once: the limit, not more"


def test_sync_listeners_run_on_the_pools_threads_not_the_loop(pool: AsyncListenerPool) -> None:
    seen: list[tuple[str, bool]] = []

    def listener(n: int) -> int:
        try:
            asyncio.get_running_loop()
            on_loop = True
        except RuntimeError:
            on_loop = False
        seen.append((threading.current_thread().name, on_loop))
        return n * 2

    outcome = _apply(pool, lambda: invoke.run_sync_listener(listener, (21,), {}))
    assert outcome.done.wait(10)
    assert outcome.results == [42]
    assert seen[0][0].startswith("celery-events-sync")
    assert seen[0][1] is False


def test_a_soft_time_limit_cancels_the_listener_and_raises_soft_time_limit_exceeded(pool: AsyncListenerPool) -> None:
    caught: list[str] = []

    async def listener() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            caught.append("cancelled")
            raise

    def target() -> str:
        try:
            invoke.run_async_listener(listener())
        except SoftTimeLimitExceeded:
            return "soft limit"
        return "finished"

    outcome = _apply(pool, target, soft_timeout=0.2, timeout=10)
    assert outcome.done.wait(10)
    assert outcome.results == ["soft limit"]
    assert caught == ["cancelled"]
    assert outcome.timeouts == [(True, 0.2)]


def test_a_hard_time_limit_tells_celery_once_and_abandons_the_task(pool: AsyncListenerPool) -> None:
    async def ignores_cancellation() -> None:
        for _ in range(30):
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.1)

    outcome = _apply(pool, lambda: invoke.run_async_listener(ignores_cancellation()), timeout=0.3)
    deadline = time.monotonic() + 5
    while not outcome.timeouts and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    assert outcome.timeouts == [(False, 0.3)]
    assert outcome.results == [], "no second outcome after Celery handled the hard limit"


def test_a_listener_error_reaches_the_tracer_as_it_would_under_prefork(pool: AsyncListenerPool) -> None:
    async def listener() -> None:
        raise ConnectionError("mail server busy")

    def target() -> str:
        try:
            invoke.run_async_listener(listener())
        except ConnectionError as exc:
            return f"caught {exc}"
        return "no error"

    outcome = _apply(pool, target)
    assert outcome.done.wait(10)
    assert outcome.results == ["caught mail server busy"]


def test_warm_shutdown_waits_for_the_tasks_in_flight() -> None:
    made = AsyncListenerPool(limit=4)
    made.start()

    async def listener() -> str:
        await asyncio.sleep(0.3)
        return "done"

    outcome = _apply(made, lambda: invoke.run_async_listener(listener()))
    made.stop()
    close_loop()
    assert outcome.results == ["done"]


def test_async_concurrency_sets_the_pool_concurrency_and_prefetch_in_the_celery_config() -> None:
    app = build_celery_app(CeleryEventsConfig(broker_url="redis://localhost:6379/0", async_concurrency=50))
    assert app.conf.worker_pool == ASYNC_POOL
    assert app.conf.worker_concurrency == 50
    assert app.conf.worker_prefetch_multiplier == 2
    untouched = build_celery_app(CeleryEventsConfig(broker_url="redis://localhost:6379/0"))
    assert untouched.conf.worker_pool == "prefork"


def test_celery_config_still_wins_over_what_async_concurrency_sets() -> None:
    config = CeleryEventsConfig(
        broker_url="redis://localhost:6379/0", async_concurrency=50, celery_config={"worker_prefetch_multiplier": 8}
    )
    assert build_celery_app(config).conf.worker_prefetch_multiplier == 8


@pytest.mark.parametrize("value", [0, -3])
def test_async_concurrency_below_one_is_refused(value: int) -> None:
    with pytest.raises(ValueError, match="async_concurrency must be at least 1"):
        CeleryEventsConfig(async_concurrency=value)


def test_acks_wait_for_a_batch_then_go_in_one_pipeline() -> None:
    qos = mock.MagicMock(unacked_index_key="unacked_index", unacked_key="unacked")
    client = qos.channel.conn_or_acquire.return_value.__enter__.return_value
    hub = mock.Mock()
    batcher = _BatchingAck(qos, hub, None)
    with mock.patch("litestar_celery_events.runtime.acks.VirtualQoS.ack") as bookkeeping:
        batcher("tag-1")
        batcher("tag-2")
        assert client.pipeline.call_count == 0, "nothing sent before the window closes"
        hub.call_later.assert_called_once()
        batcher.flush()
        pipe = client.pipeline.return_value
        pipe.zrem.assert_called_once_with("unacked_index", "tag-1", "tag-2")
        assert [c.args[1] for c in bookkeeping.call_args_list] == ["tag-1", "tag-2"]
        for n in range(MAX_ACK_BATCH):
            batcher(f"t{n}")
        assert client.pipeline.call_count == 2, "a full batch goes at once"


def test_a_reservation_is_sent_at_once_and_its_reply_read_before_the_next_acks() -> None:
    qos = mock.MagicMock(unacked_index_key="unacked_index", unacked_key="unacked")
    connection = qos.channel.client.connection_pool.get_connection.return_value
    connection.read_response.side_effect = ["OK", "QUEUED", "QUEUED", [1, 1]]
    connection.can_read.return_value = False
    message = mock.Mock(_raw={"body": "x"}, delivery_info={"exchange": "", "routing_key": "events"})
    reserve = _PipelinedReserve(qos)
    with mock.patch("litestar_celery_events.runtime.acks.VirtualQoS") as virtual:
        reserve(message, "tag-1")
        virtual.append.assert_called_once_with(qos, message, "tag-1")
    [commands] = connection.pack_commands.call_args.args
    assert [c[0] for c in commands] == ["MULTI", "ZADD", "HSET", "EXEC"]
    assert commands[2][1:3] == ("unacked", "tag-1")
    connection.send_packed_command.assert_called_once()
    assert reserve.unread == 4 and connection.read_response.call_count == 0, "no waiting for the reply"

    batcher = _BatchingAck(qos, mock.Mock(), reserve)
    batcher.pending.append("tag-1")
    with mock.patch("litestar_celery_events.runtime.acks.VirtualQoS"):
        batcher.flush()
    assert reserve.unread == 0 and connection.read_response.call_count == 4, "replies read before the ack"


def test_an_error_inside_a_reservation_reply_raises() -> None:
    qos = mock.MagicMock(unacked_index_key="unacked_index", unacked_key="unacked")
    connection = qos.channel.client.connection_pool.get_connection.return_value
    connection.read_response.side_effect = ["OK", "QUEUED", "QUEUED", [redis.ResponseError("OOM"), 1]]
    reserve = _PipelinedReserve(qos)
    reserve.unread = 4
    with pytest.raises(redis.ResponseError, match="OOM"):
        reserve.drain()


def test_the_next_brpop_is_sent_before_the_message_is_delivered_and_stays_marked_in_flight() -> None:
    order: list[str] = []
    channel = mock.Mock()
    channel._in_poll = "conn"
    channel._pending_reauth_token.return_value = None
    channel.qos.can_consume.return_value = True
    transport = channel.connection

    def register(ch: Any) -> None:
        order.append("brpop sent")
        ch._in_poll = "conn"

    transport.cycle._register_BRPOP.side_effect = register
    transport._deliver.side_effect = lambda message, queue: order.append("delivered")

    def kombu_read(**_: Any) -> bool:  # what kombu's _brpop_read does around _deliver
        channel.connection._deliver({"m": 1}, "events")
        channel._in_poll = None
        return True

    channel.handlers = {"BRPOP": kombu_read}
    patch = _EarlyBrpop(channel)
    patch.install()
    assert channel.handlers["BRPOP"]()
    assert order == ["brpop sent", "delivered"]
    assert channel._in_poll == "conn", "the early BRPOP is still in flight: kombu must not send another"

    channel._pending_reauth_token.return_value = "token"  # a re-auth waits for an idle connection
    order.clear()
    channel.handlers["BRPOP"]()
    assert order == ["delivered"]
    patch.uninstall()
    assert channel.handlers["BRPOP"] is kombu_read


@pytest.mark.parametrize(
    ("argv", "asked"),
    [
        (["celery", "-A", "worker", "worker", "-P", "prefork"], True),
        (["celery", "worker", "--pool=prefork"], True),
        (["celery", "worker", "--pool", "prefork", "-c", "2"], True),
        (["celery", "worker", "-P", "processes"], False),
        (["celery", "worker"], False),
    ],
)
def test_an_explicit_prefork_flag_is_noticed(argv: list[str], asked: bool) -> None:
    """Celery replaces ``-P prefork`` with a configured worker_pool: the pool warns about it."""
    assert _asked_for_prefork(argv) is asked
