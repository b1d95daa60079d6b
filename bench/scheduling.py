"""Delayed events at scale: store memory per event, worker RSS idle vs 100,000 scheduled, due->start latency.

``python -m bench.scheduling [--events 100000] [--latency-events 200] [--compare-eta 0]`` prints JSON;
the bench runner calls ``run(results)``. A private redis-server and a real ``celery -A worker
worker`` (prefork, 2 children) on this module's app:

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

from bench.common import CeleryWorker, RedisServer, machine, percentile, versions, wait_for
from litestar_celery_events import CeleryEventEmitter, CeleryEventsConfig, CeleryEventsPlugin, emit_later, listener
from litestar_celery_events.schedule_store import redis_keys

__all__ = ("create_app", "run")

QUEUE = "bench-sched"
LATENCY_KEY = "bench:sched:latency"
_client: list[redis.Redis] = []


def _redis() -> redis.Redis:
    if not _client:
        _client.append(redis.Redis.from_url(os.environ["BENCH_REDIS_URL"]))
    return _client[0]


@listener("bench_due")
def on_due(due: float, **kwargs: Any) -> None:
    """Records how late it started after its due time."""
    _redis().rpush(LATENCY_KEY, time.time() - due)


@listener("bench_later")
def on_later(n: int, **kwargs: Any) -> None:
    pass


def create_app() -> Litestar:
    config = CeleryEventsConfig(
        broker_url=os.environ["BENCH_REDIS_URL"],
        default_queue=QUEUE,
        data_dir=os.environ.get("CELERY_EVENTS_DATA_DIR"),
        max_buffered_events=200_000,
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


def run(results: dict[str, Any], events: int = 100_000, latency_events: int = 200, compare_eta: int = 0) -> None:
    """Measure and put the figures under ``results["scheduling"]``."""
    out: dict[str, Any] = {"events": events}
    with RedisServer() as server, tempfile.TemporaryDirectory(prefix="bench-sched-") as tmp:
        env = {
            "BENCH_REDIS_URL": server.url,
            "CELERY_BROKER_URL": server.url,
            "LITESTAR_APP": "bench.scheduling:create_app",
            "CELERY_EVENTS_DATA_DIR": tmp,
        }
        os.environ.update(env)
        admin = server.client()
        zset, messages, _, _ = redis_keys()
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
            used_before = int(admin.info("memory")["used_memory"])

            started = time.perf_counter()
            out["emit_later_seconds"] = round(_schedule(app, events, 3600), 2)
            wait_for(lambda: admin.zcard(zset) >= events, 120, "the store to hold every scheduled event", 0.1)
            out["in_store_after_seconds"] = round(time.perf_counter() - started, 2)
            used_after = int(admin.info("memory")["used_memory"])
            store_bytes = int(admin.memory_usage(zset, samples=0) or 0) + int(
                admin.memory_usage(messages, samples=0) or 0
            )
            out["redis_used_memory_delta_mib"] = round((used_after - used_before) / 2**20, 1)
            out["bytes_per_event_used_memory"] = round((used_after - used_before) / events)
            out["bytes_per_event_memory_usage"] = round(store_bytes / events)
            sample = admin.hrandfield(messages)
            out["stored_message_bytes"] = len(admin.hget(messages, sample) or b"") if sample else 0
            time.sleep(10)  # an ETA design would be prefetching by now
            out["worker_rss_with_scheduled_mib"] = worker_rss_mib(worker.proc.pid)
            out["worker_rss_delta_mib"] = round(out["worker_rss_with_scheduled_mib"] - out["worker_rss_idle_mib"], 1)
            out["queue_length_while_undue"] = int(admin.llen(QUEUE))

            # Light load: one event due every 50 ms, scheduled 2 s ahead; the listener records start - due.
            admin.delete(LATENCY_KEY)
            first_due = time.time() + 2.0
            for i in range(latency_events):
                due = first_due + i * 0.05
                emit_later(app, "bench_due", due=due, delay=due - time.time())
            wait_for(
                lambda: admin.llen(LATENCY_KEY) >= latency_events,
                first_due - time.time() + latency_events * 0.05 + 30,
                "the latency events",
                0.2,
            )
            lateness = [float(x) * 1000 for x in admin.lrange(LATENCY_KEY, 0, -1)]
            out["due_to_start_ms"] = {
                "median": round(statistics.median(lateness), 1),
                "p90": round(percentile(lateness, 90), 1),
                "p99": round(percentile(lateness, 99), 1),
                "min": round(min(lateness), 1),
                "max": round(max(lateness), 1),
                "n": len(lateness),
                "early": sum(1 for x in lateness if x < 0),
            }

            if compare_eta:
                out["celery_eta_comparison"] = _compare_eta(worker, compare_eta)
        finally:
            emitter.stop()
            worker.stop()
    results["scheduling"] = out


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
    options = parser.parse_args()
    results: dict[str, Any] = {"machine": machine(), "versions": versions()}
    run(results, options.events, options.latency_events, options.compare_eta)
    json.dump(results, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
