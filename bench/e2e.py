"""End to end through real ``celery worker`` processes (prefork ``-c 2``), side by side.

- throughput: a queue pre-filled with N task messages, drained by one worker; the rate is taken
  between the first and the last ``skip`` messages (worker start-up and the tail excluded).
  Events with one no-op sync listener vs a plain Celery no-op task; an async no-op listener on
  the persistent loop vs the same no-op run by ``asyncio.run()`` per call (as a listener, and as a
  plain Celery task).
- latency: emit -> listener start at a steady 200 events/s, vs ``apply_async`` -> task start.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import CeleryWorker, RedisServer, percentile, ratio, summary, wait_for

__all__ = ("EVENTS_QUEUE", "PLAIN_QUEUE", "fill", "run_e2e", "wait_consuming", "worker_args")

EVENTS_QUEUE = "bench-e2e-events"
PLAIN_QUEUE = "bench-e2e-plain"
WORKER_FLAGS = ("--without-gossip", "--without-mingle", "--without-heartbeat")


def worker_args(queue: str) -> list[str]:
    return ["-P", "prefork", "-c", "2", "-Q", queue, "--loglevel", "WARNING", *WORKER_FLAGS]


def fill(redis: RedisServer, task_name: str, queue: str, n: int) -> None:
    """Put ``n`` Celery task messages for ``task_name`` on ``queue``, pipelined."""
    from celery import Celery

    from litestar_celery_events.contract.message import Emission
    from litestar_celery_events.transports.redis import RedisTransport

    app = Celery(set_as_current=False)
    app.conf.broker_url = redis.url
    transport = RedisTransport(app)
    batch = [
        Emission.create(task_name.rpartition(".")[2], task_name, (), {"n": i}, max_payload_bytes=10**6, queue=queue)
        for i in range(n)
    ]
    for i in range(0, n, 1000):
        transport.publish(batch[i : i + 1000], [0])
    transport.close()


def wait_consuming(redis: RedisServer, worker: CeleryWorker, task_name: str, queue: str) -> None:
    """The worker (at ``--loglevel WARNING`` it prints no "ready.") has drained a few warm-up messages."""
    client = redis.client()
    fill(redis, task_name, queue, 20)

    def drained() -> bool:
        if worker.proc.poll() is not None:
            raise RuntimeError(f"celery worker exited with {worker.proc.returncode}:\n{worker.output()[-3000:]}")
        return int(client.llen(queue)) == 0

    wait_for(drained, 90, f"the worker on {queue} to consume", 0.05)
    time.sleep(0.3)


def drain_rate(redis: RedisServer, task_name: str, queue: str, n: int, skip: int) -> float:
    client = redis.client()
    fill(redis, task_name, queue, n)
    t0 = wait_for(lambda: client.llen(queue) <= n - skip and time.perf_counter(), 60, "the worker to start", 0.002)
    t1 = wait_for(lambda: client.llen(queue) <= skip and time.perf_counter(), 120, "the worker to drain", 0.002)
    wait_for(lambda: client.llen(queue) == 0, 60, "the queue to empty")
    time.sleep(0.3)  # the last prefetched messages finish
    return (n - 2 * skip) / (t1 - t0)


def latency(redis: RedisServer, send: Any, rate: float, seconds: float, file: Path) -> dict[str, float]:
    file.write_text("")
    interval = 1.0 / rate
    start = time.perf_counter()
    count = int(rate * seconds)
    for i in range(count):
        delay = start + i * interval - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        send(time.time())
    wait_for(lambda: len(file.read_text().split()) >= count, 30, "every latency record")
    values = [float(x) * 1000 for x in file.read_text().split()][int(rate * 0.5) :]  # first 0.5 s: warm-up
    return {"p50_ms": percentile(values, 50), "p99_ms": percentile(values, 99), "n": len(values)}


def run_e2e(redis: RedisServer, reps: int, n: int = 4_000, skip: int = 400, latency_s: float = 5.0) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    latency_file = folder / "latency.txt"
    env = {"BENCH_REDIS_URL": redis.url, "BENCH_EVENTS_QUEUE": EVENTS_QUEUE, "BENCH_LATENCY_FILE": str(latency_file)}
    os.environ.update(env)
    events_worker = CeleryWorker("bench.events_worker", worker_args(EVENTS_QUEUE), env, folder / "events.log")
    plain_worker = CeleryWorker("bench.plain_worker", worker_args(PLAIN_QUEUE), env, folder / "plain.log")
    rates: dict[str, list[float]] = {
        "events_sync": [],
        "plain_sync": [],
        "plain_acks_late": [],
        "events_async": [],
        "events_asyncio_run": [],
        "plain_asyncio_run": [],
    }
    lat: dict[str, list[dict[str, float]]] = {"events": [], "plain": []}
    from bench.apps import create_events_app
    from bench.plain_worker import app as plain_app
    from bench.plain_worker import latency as latency_task

    plain_app.conf.broker_url = redis.url
    emitter = create_events_app(queue=EVENTS_QUEUE).event_emitter
    try:
        wait_consuming(redis, events_worker, "events.bench_sync", EVENTS_QUEUE)
        wait_consuming(redis, plain_worker, "bench.noop", PLAIN_QUEUE)
        emitter.start()
        for rep in range(reps):
            pairs = [
                ("events_sync", "events.bench_sync", EVENTS_QUEUE),
                ("plain_sync", "bench.noop", PLAIN_QUEUE),
                ("plain_acks_late", "bench.noop_late", PLAIN_QUEUE),
                ("events_async", "events.bench_async", EVENTS_QUEUE),
                ("events_asyncio_run", "events.bench_asyncio_run", EVENTS_QUEUE),
                ("plain_asyncio_run", "bench.noop_asyncio_run", PLAIN_QUEUE),
            ]
            for name, task, queue in pairs if rep % 2 == 0 else pairs[::-1]:
                rates[name].append(drain_rate(redis, task, queue, n, skip))
            for name, send in (
                ("events", lambda t: emitter.emit("bench_latency", t=t)),
                ("plain", lambda t: latency_task.apply_async(kwargs={"t": t}, queue=PLAIN_QUEUE)),
            ):
                lat[name].append(latency(redis, send, 200.0, latency_s, latency_file))
    finally:
        emitter.stop()
        stoppers = [threading.Thread(target=w.stop) for w in (events_worker, plain_worker)]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join()
    return {
        "messages": n,
        "measured": n - 2 * skip,
        "events_per_s": {name: summary(values) for name, values in rates.items()},
        "ratio_sync": ratio(rates["events_sync"], rates["plain_sync"]),
        "ratio_sync_vs_acks_late": ratio(rates["events_sync"], rates["plain_acks_late"]),
        "ratio_async": ratio(rates["events_async"], rates["events_asyncio_run"]),
        "ratio_async_vs_plain": ratio(rates["events_async"], rates["plain_asyncio_run"]),
        "latency_rate_per_s": 200,
        "latency_p50_ms": {name: summary([x["p50_ms"] for x in v]) for name, v in lat.items()},
        "latency_p99_ms": {name: summary([x["p99_ms"] for x in v]) for name, v in lat.items()},
    }
