"""In-process benchmarks: the cost of one ``emit`` call, publish throughput, async listener calls.

- ``emit_cost``: per-call time of ``CeleryEventEmitter.emit`` (publisher thread running, real
  Redis), of Litestar's ``SimpleEventEmitter.emit`` (inside its event loop) and of Celery's
  ``apply_async``, measured one call at a time with ``perf_counter_ns``.
- ``publish_throughput``: events/s from the first ``emit`` until the last one is in Redis, from
  one process, against a plain ``apply_async`` loop.
- ``publish_throughput_amqp``: the same on RabbitMQ, until the broker confirmed the last event
  (publisher confirms), against a plain ``apply_async`` loop on the same RabbitMQ.
- ``async_calls``: an async no-op listener on the persistent loop vs ``asyncio.run()`` per call.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
import uuid
from typing import Any

from bench.common import RedisServer, percentile, ratio, summary, wait_for

__all__ = ("async_calls", "emit_cost", "publish_throughput", "publish_throughput_amqp")

AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")

PUBLISH_QUEUE = "bench-publish"
PLAIN_QUEUE = "bench-publish-plain"


def _events_emitter(redis_url: str, queue: str, **config: Any) -> Any:
    import os

    os.environ["BENCH_REDIS_URL"] = redis_url
    from bench.apps import create_events_app

    app = create_events_app(queue=queue)
    emitter = app.event_emitter
    for key, value in config.items():
        setattr(emitter.config, key, value)
    return emitter


def _per_call_ns(fn: Any, n: int) -> list[int]:
    timings = []
    perf = time.perf_counter_ns
    for i in range(n):
        t0 = perf()
        fn("user_created", email="user@example.com", n=i)
        timings.append(perf() - t0)
    return timings


def emit_cost(redis: RedisServer, reps: int, calls: int = 20_000) -> dict[str, Any]:
    from litestar.events import SimpleEventEmitter
    from litestar.events import listener as litestar_listener

    from bench.plain_worker import app as plain_app
    from bench.plain_worker import noop

    plain_app.conf.broker_url = redis.url
    client = redis.client()

    @litestar_listener("user_created")
    async def simple_listener(**kwargs: Any) -> None:
        pass

    async def simple_run() -> list[int]:
        async with SimpleEventEmitter([simple_listener]) as emitter:
            timings: list[int] = []
            for _ in range(calls // 1000):  # let the listeners run between chunks, as a server would
                timings += _per_call_ns(emitter.emit, 1000)
                await asyncio.sleep(0)
            return timings

    def apply_async(event_id: str, **kwargs: Any) -> None:
        noop.apply_async(kwargs=kwargs, queue=PLAIN_QUEUE)

    emitter = _events_emitter(redis.url, PUBLISH_QUEUE)
    emitter.start()
    p50: dict[str, list[float]] = {"events": [], "simple": [], "apply_async": []}
    p99: dict[str, list[float]] = {"events": [], "simple": [], "apply_async": []}
    try:
        apply_async("warm")
        for _ in range(reps):
            gc.collect()
            for name, timings in (
                ("events", lambda: _per_call_ns(emitter.emit, calls)),
                ("simple", lambda: asyncio.run(simple_run())),
                ("apply_async", lambda: _per_call_ns(apply_async, calls // 10)),
            ):
                values = timings()
                p50[name].append(percentile(values, 50) / 1000)
                p99[name].append(percentile(values, 99) / 1000)
            wait_for(lambda: emitter.publisher.pending == 0, timeout=30, what="the publisher to catch up")
            client.delete(PUBLISH_QUEUE, PLAIN_QUEUE)
    finally:
        emitter.stop()
        client.delete(PUBLISH_QUEUE, PLAIN_QUEUE)
    return {
        "calls": calls,
        "p50_us": {name: summary(values) for name, values in p50.items()},
        "p99_us": {name: summary(values) for name, values in p99.items()},
        "speedup_vs_apply_async": ratio(p50["apply_async"], p50["events"]),
        "cost_vs_simple": ratio(p50["events"], p50["simple"]),
    }


def publish_throughput(redis: RedisServer, reps: int, events: int = 50_000, plain: int = 3_000) -> dict[str, Any]:
    from bench.plain_worker import app as plain_app
    from bench.plain_worker import noop

    plain_app.conf.broker_url = redis.url
    client = redis.client()
    emitter = _events_emitter(redis.url, PUBLISH_QUEUE, max_buffered_events=events + 1)
    emitter.start()
    ours: list[float] = []
    ours_cpu: list[float] = []
    base: list[float] = []
    base_cpu: list[float] = []
    try:
        noop.apply_async(kwargs={}, queue=PLAIN_QUEUE)
        for _ in range(reps):
            client.delete(PUBLISH_QUEUE, PLAIN_QUEUE)
            gc.collect()
            start, cpu = time.perf_counter(), time.process_time()
            emit = emitter.emit
            for i in range(events):
                emit("user_created", email="user@example.com", n=i)
            wait_for(lambda: client.llen(PUBLISH_QUEUE) >= events, timeout=60, what="all events in Redis")
            ours.append(events / (time.perf_counter() - start))
            ours_cpu.append((time.process_time() - cpu) / events * 1e6)

            start, cpu = time.perf_counter(), time.process_time()
            for i in range(plain):
                noop.apply_async(kwargs={"email": "user@example.com", "n": i}, queue=PLAIN_QUEUE)
            base.append(plain / (time.perf_counter() - start))
            base_cpu.append((time.process_time() - cpu) / plain * 1e6)
            assert client.llen(PLAIN_QUEUE) == plain
    finally:
        emitter.stop()
        client.delete(PUBLISH_QUEUE, PLAIN_QUEUE)
    return {
        "events": events,
        "plain_messages": plain,
        "events_per_s": summary(ours),
        "apply_async_per_s": summary(base),
        "cpu_us_per_event": summary(ours_cpu),
        "cpu_us_per_apply_async": summary(base_cpu),
        "ratio": ratio(ours, base),
    }


def publish_throughput_amqp(reps: int, events: int = 20_000, plain: int = 2_000) -> dict[str, Any]:
    """Events/s until RabbitMQ confirmed the last one, against ``apply_async`` on the same RabbitMQ."""
    from celery import Celery
    from kombu import Connection
    from litestar.events import listener as litestar_listener

    from litestar_celery_events import CeleryEventEmitter, CeleryEventsConfig
    from litestar_celery_events.celery_app import secure_defaults

    @litestar_listener("user_created")
    def on_user_created(**kwargs: Any) -> None:
        pass

    tag = uuid.uuid4().hex[:8]
    ours_queue, plain_queue = f"bench-publish-{tag}", f"bench-publish-plain-{tag}"
    config = CeleryEventsConfig(broker_url=AMQP_URL, default_queue=ours_queue, max_buffered_events=events + 1)
    emitter = CeleryEventEmitter.bound_to(config)([on_user_created])
    plain_app = Celery("bench-plain-amqp", set_as_current=False)
    plain_app.conf.update(secure_defaults(), broker_url=AMQP_URL)

    @plain_app.task(name="bench.noop", ignore_result=True)
    def noop(*args: Any, **kwargs: Any) -> None:
        pass

    ours: list[float] = []
    base: list[float] = []
    emitter.start()
    connection = Connection(AMQP_URL)
    channel = connection.default_channel
    try:
        noop.apply_async(kwargs={}, queue=plain_queue)
        for _ in range(reps):
            channel.queue_purge(plain_queue)
            gc.collect()
            target = emitter.publisher.published + events
            start = time.perf_counter()
            emit = emitter.emit
            for i in range(events):
                emit("user_created", email="user@example.com", n=i)
            wait_for(lambda t=target: emitter.publisher.published >= t, timeout=120, what="confirms")
            ours.append(events / (time.perf_counter() - start))

            start = time.perf_counter()
            for i in range(plain):
                noop.apply_async(kwargs={"email": "user@example.com", "n": i}, queue=plain_queue)
            base.append(plain / (time.perf_counter() - start))
        in_queue = channel.queue_declare(ours_queue, passive=True).message_count
    finally:
        emitter.stop()
        for queue in (ours_queue, plain_queue):
            channel.queue_delete(queue)
        connection.release()
    return {
        "events": events,
        "plain_messages": plain,
        "in_queue": in_queue,
        "events_per_s": summary(ours),
        "apply_async_per_s": summary(base),
        "ratio": ratio(ours, base),
    }


def async_calls(reps: int, calls: int = 3_000) -> dict[str, Any]:
    from litestar_celery_events.runtime.event_loop import run_coroutine

    async def noop() -> None:
        pass

    persistent: list[float] = []
    per_call: list[float] = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(calls):
            run_coroutine(noop())
        persistent.append((time.perf_counter() - start) / calls * 1e6)
        start = time.perf_counter()
        for _ in range(calls // 3):
            asyncio.run(noop())
        per_call.append((time.perf_counter() - start) / (calls // 3) * 1e6)
    return {
        "persistent_loop_us": summary(persistent),
        "asyncio_run_us": summary(per_call),
        "speedup": ratio(per_call, persistent),
    }
