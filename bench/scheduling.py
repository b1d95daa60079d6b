"""Delayed events at scale: store memory per event, worker RSS idle vs 100,000 scheduled, due->start latency.

``python -m bench.scheduling [--events N] [--latency-events N] [--compare-eta N] [--broker redis]``
prints JSON; the bench runner calls ``run(results)``. ``--broker amqp|embedded`` measures those
brokers instead (RabbitMQ on 127.0.0.1:5672: its delay levels, see also ``bench.amqp_delayed``;
embedded: Celery's ETA; no Redis-store figures then). A private
redis-server and a real ``celery -A worker worker`` (prefork, 2 children) on this module's app:

1. worker RSS (main + children) idle;
2. ``emit_later`` of N events one hour ahead: Redis ``used_memory`` delta and ``MEMORY USAGE`` of the
   store per event, time to schedule them, then the worker's RSS again (it must not have moved:
   undue events never reach a worker);
3. light load: events due every 50 ms over a few seconds; the listener records start - due;
4. optional (``--compare-eta N``): the same worker after N plain Celery ``countdown=3600`` tasks, the
   design this avoids (workers prefetch ETA tasks and hold them in memory).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
from litestar import Litestar

from bench.common import CeleryWorker, RedisServer, bench_redis, machine, percentile, versions, wait_for
from litestar_celery_events import CeleryEventEmitter, CeleryEventsConfig, CeleryEventsPlugin, emit_later, listener
from litestar_celery_events.stores.schedule import redis_keys

__all__ = ("create_app", "run")

QUEUE = os.environ.get("BENCH_SCHED_QUEUE", "bench-sched")
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"
LATENCY_KEY = "bench:sched:latency"


@listener("bench_due")
def on_due(due: float, **kwargs: Any) -> None:
    """Records how late it started after its due time."""
    bench_redis().rpush(LATENCY_KEY, time.time() - due)


@listener("bench_later")
def on_later(n: int, **kwargs: Any) -> None:
    pass


def create_app() -> Litestar:
    config = CeleryEventsConfig(
        broker_url=os.environ["BENCH_BROKER_URL"],
        default_queue=QUEUE,
        data_dir=os.environ.get("CELERY_EVENTS_DATA_DIR"),
        max_buffered_events=200_000,
        celery_config={"celery_events_delay_prefix": os.environ.get("BENCH_DELAY_PREFIX", "celery_events")},
    )
    return Litestar(listeners=[on_due, on_later], plugins=[CeleryEventsPlugin(config)])


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def worker_rss_mib(pid: int) -> float:
    """RSS of a worker's main process plus its pool children, in MiB."""
    return round(sum(_rss_kib(p) for p in [pid, *_children(pid)]) / 1024, 1)


def _schedule(app: Litestar, count: int, delay_s: float) -> float:
    emitter = app.event_emitter
    assert isinstance(emitter, CeleryEventEmitter)
    started = time.perf_counter()
    for n in range(count):
        while emitter.publisher.pending > 150_000:  # keep under max_buffered_events
            time.sleep(0.01)
        emit_later(app, "bench_later", n=n, delay=delay_s)
    return time.perf_counter() - started


def run(
    results: dict[str, Any],
    events: int = 100_000,
    latency_events: int = 200,
    compare_eta: int = 0,
    broker: str = "redis",
) -> None:
    """Measure; the figures go to ``results["scheduling"]`` (``results["scheduling_<broker>"]`` for others)."""
    global QUEUE
    out: dict[str, Any] = {"broker": broker, "events": events}
    with RedisServer() as server, tempfile.TemporaryDirectory(prefix="bench-sched-") as tmp:
        broker_url = {"redis": server.url, "amqp": AMQP_URL, "embedded": "filesystem://"}[broker]
        QUEUE = f"bench-sched-{os.getpid()}" if broker == "amqp" else "bench-sched"
        env = {
            "BENCH_REDIS_URL": server.url,
            "BENCH_BROKER_URL": broker_url,
            "BENCH_SCHED_QUEUE": QUEUE,
            "BENCH_DELAY_PREFIX": f"bench-sched-{os.getpid()}",  # RabbitMQ: delay levels of this run only
            "CELERY_BROKER_URL": broker_url,
            "LITESTAR_APP": "bench.scheduling:create_app",
            "CELERY_EVENTS_DATA_DIR": tmp,
        }
        os.environ.update(env)
        worker = CeleryWorker(
            "worker",
            ["--loglevel", "INFO", "--concurrency", "2", "--queues", QUEUE, "--without-gossip", "--without-mingle"],
            env,
            Path(tmp) / "worker.log",
        )
        app = create_app()
        emitter = app.event_emitter
        assert isinstance(emitter, CeleryEventEmitter)
        emitter.start()
        try:
            worker.wait_ready()
            time.sleep(3)
            out["worker_rss_idle_mib"] = worker_rss_mib(worker.proc.pid)
            if broker == "redis":
                _scheduled_in_store(app, server.client(), worker, out)
            else:
                started = time.perf_counter()
                out["emit_later_seconds"] = round(_schedule(app, events, 3600), 2)
                wait_for(lambda: emitter.publisher.pending == 0, 300, "the publisher to send every event", 0.1)
                out["published_after_seconds"] = round(time.perf_counter() - started, 2)
                _settle_rss(worker, out)
            out["due_to_start_ms"] = _latency(app, server.client(), latency_events)
            if compare_eta:
                out["celery_eta_comparison"] = _compare_eta(worker, compare_eta)
        finally:
            emitter.stop()
            worker.stop()
            if broker == "amqp":
                _delete_amqp_queue(QUEUE)
    results["scheduling" if broker == "redis" else f"scheduling_{broker}"] = out


def _scheduled_in_store(app: Litestar, admin: redis.Redis, worker: CeleryWorker, out: dict[str, Any]) -> None:
    """Redis: N events an hour ahead; store memory per event, and the worker's RSS (unchanged)."""
    events = out["events"]
    zset, messages, _, _ = redis_keys()
    used_before = int(admin.info("memory")["used_memory"])
    started = time.perf_counter()
    out["emit_later_seconds"] = round(_schedule(app, events, 3600), 2)
    wait_for(lambda: admin.zcard(zset) >= events, 120, "the store to hold every scheduled event", 0.1)
    out["in_store_after_seconds"] = round(time.perf_counter() - started, 2)
    used_after = int(admin.info("memory")["used_memory"])
    store_bytes = sum(int(admin.memory_usage(key, samples=0) or 0) for key in (zset, messages))
    out["redis_used_memory_delta_mib"] = round((used_after - used_before) / 2**20, 1)
    out["bytes_per_event_used_memory"] = round((used_after - used_before) / events)
    out["bytes_per_event_memory_usage"] = round(store_bytes / events)
    sample = admin.hrandfield(messages)
    out["stored_message_bytes"] = len(admin.hget(messages, sample) or b"") if sample else 0
    time.sleep(10)  # an ETA design would be prefetching by now
    out["worker_rss_with_scheduled_mib"] = worker_rss_mib(worker.proc.pid)
    out["worker_rss_delta_mib"] = round(out["worker_rss_with_scheduled_mib"] - out["worker_rss_idle_mib"], 1)
    out["queue_length_while_undue"] = int(admin.llen(QUEUE))


def _latency(app: Litestar, admin: redis.Redis, count: int) -> dict[str, Any]:
    """Light load: one event due every 50 ms, scheduled 2 s ahead; the listener records start - due."""
    admin.delete(LATENCY_KEY)
    first_due = time.time() + 2.0
    for i in range(count):
        due = first_due + i * 0.05
        emit_later(app, "bench_due", due=due, delay=due - time.time())
    deadline = time.monotonic() + 2.0 + count * 0.05 + 60
    while admin.llen(LATENCY_KEY) < count and time.monotonic() < deadline:
        time.sleep(0.2)
    lateness = [float(x) * 1000 for x in admin.lrange(LATENCY_KEY, 0, -1)]
    if not lateness:
        return {"n": 0, "missing": count}
    return {
        "missing": count - len(lateness),
        "median": round(statistics.median(lateness), 1),
        "p90": round(percentile(lateness, 90), 1),
        "p99": round(percentile(lateness, 99), 1),
        "min": round(min(lateness), 1),
        "max": round(max(lateness), 1),
        "n": len(lateness),
        "early": sum(1 for x in lateness if x < 0),
    }


def _settle_rss(worker: CeleryWorker, out: dict[str, Any]) -> None:
    """Not Redis: wait until the worker's RSS stops growing (with Celery's ETA it prefetches every delayed event)."""
    started = time.perf_counter()
    previous, rss = -1.0, worker_rss_mib(worker.proc.pid)
    while rss - previous > 1.0 and time.perf_counter() - started < 300:
        time.sleep(5)
        previous, rss = rss, worker_rss_mib(worker.proc.pid)
    out["worker_rss_with_scheduled_mib"] = rss
    out["worker_rss_delta_mib"] = round(rss - out["worker_rss_idle_mib"], 1)
    out["kib_per_scheduled_event_in_worker"] = round(out["worker_rss_delta_mib"] * 1024 / out["events"], 2)
    out["worker_settled_after_seconds"] = round(time.perf_counter() - started, 1)


def _delete_amqp_queue(name: str) -> None:
    """The run's queue and its delay levels, with what still waits in them."""
    from kombu import Connection

    from litestar_celery_events.transports.amqp_delay import DelayLevels

    levels = DelayLevels(os.environ["BENCH_DELAY_PREFIX"])
    with Connection(AMQP_URL) as connection:
        channel = connection.default_channel
        channel.queue_delete(name)
        for level in levels.names():
            if level != levels.delivery_exchange:
                channel.queue_delete(level)
            channel.exchange_delete(level)


def _compare_eta(worker: CeleryWorker, count: int) -> dict[str, Any]:
    """Plain Celery: ``countdown=3600`` tasks on the same queue; the worker reserves them in memory."""
    from celery import Celery

    before = worker_rss_mib(worker.proc.pid)
    plain = Celery(set_as_current=False, broker=os.environ["BENCH_REDIS_URL"])
    plain.conf.task_serializer = "json"
    started = time.perf_counter()
    with plain.producer_or_acquire() as producer:
        for n in range(count):
            plain.send_task("events.bench_later", kwargs={"n": n}, countdown=3600, queue=QUEUE, producer=producer)
    published_s = time.perf_counter() - started
    admin = redis.Redis.from_url(os.environ["BENCH_REDIS_URL"])
    wait_for(lambda: admin.llen(QUEUE) == 0, 180, "the worker to reserve every ETA task", 0.5)
    time.sleep(5)
    after = worker_rss_mib(worker.proc.pid)
    return {
        "tasks": count,
        "publish_seconds": round(published_s, 1),
        "worker_rss_before_mib": before,
        "worker_rss_after_mib": after,
        "kib_per_task": round((after - before) * 1024 / count, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--latency-events", type=int, default=200)
    parser.add_argument("--compare-eta", type=int, default=0, help="also measure N plain Celery ETA tasks")
    parser.add_argument("--broker", choices=["redis", "amqp", "embedded"], default="redis")
    options = parser.parse_args()
    results: dict[str, Any] = {"machine": machine(), "versions": versions()}
    run(results, options.events, options.latency_events, options.compare_eta, options.broker)
    json.dump(results, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
