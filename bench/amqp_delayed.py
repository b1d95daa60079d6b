"""Delayed events on RabbitMQ: the delay levels side by side with Celery's ETA, in one run.

``python -m bench.amqp_delayed [--backlog N] [--due-soon N] [--scheduled N] [--eta-wait S]`` writes
``bench/results/amqp_delayed.{json,md}`` and prints the table; the bench runner calls
``run(results)``. RabbitMQ on 127.0.0.1:5672; queues and delay levels are named uniquely per run
and deleted at the end (other users of the broker are not disturbed).
A private redis-server only collects the listeners' start - due figures. Each side runs a real
``celery -A worker worker`` (prefork, 2 children) on this module's app:

1. delay levels (this library): ``emit_later`` of N events due in an hour, then 100 due in 3 s;
   the 100 listeners' start - due (p95, never early); then 100,000 more an hour ahead and the
   worker's RSS (main + children) before and after;
2. Celery's ETA (the library's former fallback, and what ``apply_async(countdown=...)`` does): the
   same N an hour ahead, then 100 due in 3 s, sent with ``send_task(eta=...)`` to a second worker
   of the same app; how many of the 100 started within ``--eta-wait`` s of their due time, and the
   worker's RSS growth meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from celery import Celery
from kombu import Connection
from litestar import Litestar

from bench.common import ROOT, CeleryWorker, RedisServer, bench_redis, machine, percentile, versions, wait_for
from bench.report import render
from bench.scheduling import worker_rss_mib
from litestar_celery_events import CeleryEventEmitter, CeleryEventsConfig, CeleryEventsPlugin, emit_later, listener
from litestar_celery_events.transports.amqp_delay import DelayLevels

__all__ = ("create_app", "run")

AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
HOUR_S = 3600
DUE_IN_S = 3.0


@listener("bench_due")
def on_due(due: float, side: str) -> None:
    """Records how late it started after its due time."""
    bench_redis().rpush(f"bench:amqp-delay:{side}", time.time() - due)


@listener("bench_later")
def on_later(n: int) -> None:
    pass


def create_app() -> Litestar:
    config = CeleryEventsConfig(
        broker_url=AMQP_URL,
        default_queue=os.environ["BENCH_QUEUE"],
        data_dir=os.environ.get("CELERY_EVENTS_DATA_DIR"),
        max_buffered_events=250_000,
        celery_config={"celery_events_delay_prefix": os.environ["BENCH_DELAY_PREFIX"]},
    )
    return Litestar(listeners=[on_due, on_later], plugins=[CeleryEventsPlugin(config)])


def _worker(env: dict[str, str], queue: str, log: Path) -> CeleryWorker:
    args = ["--loglevel", "INFO", "--concurrency", "2", "--queues", queue, "--without-gossip", "--without-mingle"]
    args += ["--hostname", f"bench-{uuid.uuid4().hex[:6]}@%h"]
    return CeleryWorker("worker", args, {**env, "BENCH_QUEUE": queue}, log)


def _lateness(side: str, expected: int, deadline: float) -> list[float]:
    key = f"bench:amqp-delay:{side}"
    while bench_redis().llen(key) < expected and time.time() < deadline:
        time.sleep(0.2)
    return [float(x) for x in bench_redis().lrange(key, 0, -1)]


def _stats(lateness: list[float], expected: int, within_s: float) -> dict[str, Any]:
    out: dict[str, Any] = {"expected": expected, "started": len(lateness)}
    out[f"started_within_{within_s:g}s"] = sum(1 for x in lateness if 0 <= x <= within_s)
    out["early"] = sum(1 for x in lateness if x < 0)
    if lateness:
        out.update(
            p50_s=round(statistics.median(lateness), 3),
            p95_s=round(percentile(lateness, 95), 3),
            min_s=round(min(lateness), 3),
            max_s=round(max(lateness), 3),
        )
    return out


def _emit(app: Litestar, count: int, delay_s: float) -> float:
    emitter = app.event_emitter
    assert isinstance(emitter, CeleryEventEmitter)
    started = time.perf_counter()
    for n in range(count):
        while emitter.publisher.pending > 200_000:
            time.sleep(0.01)
        emit_later(app, "bench_later", n=n, delay=delay_s)
    wait_for(lambda: emitter.publisher.pending == 0, 600, "the publisher to send every event", 0.05)
    return round(time.perf_counter() - started, 2)


def _delay_levels_side(env: dict[str, str], tmp: Path, backlog: int, due_soon: int, scheduled: int) -> dict[str, Any]:
    out: dict[str, Any] = {"backlog_an_hour_ahead": backlog, "due_soon": due_soon}
    worker = _worker(env, env["BENCH_QUEUE"], tmp / "levels-worker.log")
    app = create_app()
    emitter = app.event_emitter
    assert isinstance(emitter, CeleryEventEmitter)
    emitter.start()
    try:
        worker.wait_ready()
        time.sleep(3)
        out["worker_rss_idle_mib"] = worker_rss_mib(worker.proc.pid)
        out["backlog_published_s"] = _emit(app, backlog, HOUR_S)
        due = time.time() + DUE_IN_S
        for _ in range(due_soon):
            emit_later(app, "bench_due", due=due, side="levels", delay=due - time.time())
        out["due_soon_lateness"] = _stats(_lateness("levels", due_soon, due + 45), due_soon, DUE_IN_S)
        out["scheduled_an_hour_ahead"] = scheduled
        out["scheduled_published_s"] = _emit(app, scheduled, HOUR_S)
        time.sleep(15)  # an ETA design would be prefetching by now
        out["worker_rss_with_scheduled_mib"] = worker_rss_mib(worker.proc.pid)
        out["worker_rss_growth_mib"] = round(out["worker_rss_with_scheduled_mib"] - out["worker_rss_idle_mib"], 1)
        with Connection(AMQP_URL) as connection:
            channel = connection.default_channel
            out["waiting_in_delay_levels"] = DelayLevels(env["BENCH_DELAY_PREFIX"]).waiting(channel)
            out["waiting_in_event_queue"] = channel.queue_declare(queue=env["BENCH_QUEUE"], passive=True).message_count
    finally:
        emitter.stop()
        worker.stop()
    return out


def _celery_eta_side(env: dict[str, str], tmp: Path, backlog: int, due_soon: int, wait_s: float) -> dict[str, Any]:
    out: dict[str, Any] = {"backlog_an_hour_ahead": backlog, "due_soon": due_soon}
    queue = env["BENCH_ETA_QUEUE"]
    worker = _worker(env, queue, tmp / "eta-worker.log")
    plain = Celery(set_as_current=False, broker=AMQP_URL)
    plain.conf.update(task_serializer="json", accept_content=["json"])
    try:
        worker.wait_ready()
        time.sleep(3)
        out["worker_rss_idle_mib"] = worker_rss_mib(worker.proc.pid)
        started = time.perf_counter()
        with plain.producer_or_acquire() as producer:
            for n in range(backlog):
                plain.send_task("events.bench_later", kwargs={"n": n}, countdown=HOUR_S, queue=queue, producer=producer)
            out["backlog_published_s"] = round(time.perf_counter() - started, 2)
            due = time.time() + DUE_IN_S
            eta = datetime.fromtimestamp(due, tz=timezone.utc)
            for _ in range(due_soon):
                kwargs = {"due": due, "side": "eta"}
                plain.send_task("events.bench_due", kwargs=kwargs, eta=eta, queue=queue, producer=producer)
        lateness = _lateness("eta", due_soon, due + wait_s)
        out["waited_s"] = wait_s
        out["due_soon_lateness"] = _stats(lateness, due_soon, DUE_IN_S)
        out[f"due_soon_started_within_{wait_s:g}s"] = sum(1 for x in lateness if 0 <= x <= wait_s)
        out["worker_rss_after_mib"] = worker_rss_mib(worker.proc.pid)
        out["worker_rss_growth_mib"] = round(out["worker_rss_after_mib"] - out["worker_rss_idle_mib"], 1)
        with Connection(AMQP_URL) as connection:
            left = connection.default_channel.queue_declare(queue=queue, passive=True).message_count
        out["held_by_worker_after_wait"] = backlog + due_soon - len(lateness) - left
    finally:
        worker.stop()
        plain.close()
    return out


def _clean_up(env: dict[str, str]) -> None:
    with Connection(AMQP_URL) as connection:
        channel = connection.channel()
        for queue in (env["BENCH_QUEUE"], env["BENCH_ETA_QUEUE"]):
            channel.queue_delete(queue)
            channel.exchange_delete(queue)
        levels = DelayLevels(env["BENCH_DELAY_PREFIX"])
        for name in levels.names():
            if name != levels.delivery_exchange:
                channel.queue_delete(name)  # with the 110,000 waiting messages
            channel.exchange_delete(name)


def run(
    results: dict[str, Any],
    backlog: int = 10_000,
    due_soon: int = 100,
    scheduled: int = 100_000,
    eta_wait_s: float = 45,
) -> None:
    """Measure both sides; the figures go to ``results["amqp_delayed"]``."""
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
    with RedisServer() as server, tempfile.TemporaryDirectory(prefix="bench-amqp-delay-") as folder:
        tmp = Path(folder)
        env = {
            "BENCH_REDIS_URL": server.url,
            "BENCH_QUEUE": f"bench-levels-{tag}",
            "BENCH_ETA_QUEUE": f"bench-eta-{tag}",
            "BENCH_DELAY_PREFIX": f"bench-{tag}",
            "CELERY_BROKER_URL": AMQP_URL,
            "LITESTAR_APP": "bench.amqp_delayed:create_app",
            "CELERY_EVENTS_DATA_DIR": str(tmp / "data"),
        }
        os.environ.update(env)
        out: dict[str, Any] = {"delay_levels_queue_type": "quorum", "due_in_s": DUE_IN_S}
        try:
            out["delay_levels"] = _delay_levels_side(env, tmp, backlog, due_soon, scheduled)
            out["celery_eta"] = _celery_eta_side(env, tmp, backlog, due_soon, eta_wait_s)
        finally:
            _clean_up(env)
    results["amqp_delayed"] = out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backlog", type=int, default=10_000, help="events due in an hour, queued first")
    parser.add_argument("--due-soon", type=int, default=100, help="events due in 3 s, queued after the backlog")
    parser.add_argument("--scheduled", type=int, default=100_000, help="events an hour ahead for the RSS figure")
    parser.add_argument("--eta-wait", type=float, default=45.0, help="seconds the ETA side gets after the due time")
    options = parser.parse_args()
    started = time.perf_counter()
    results: dict[str, Any] = {
        "command": "python -m bench.amqp_delayed " + " ".join(sys.argv[1:]),
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions(),
        "reps": 1,
    }
    run(results, options.backlog, options.due_soon, options.scheduled, options.eta_wait)
    results["machine_end"] = machine()
    results["elapsed_s"] = round(time.perf_counter() - started, 1)
    folder = ROOT / "bench" / "results"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "amqp_delayed.json").write_text(json.dumps(results, indent=1) + "\n")
    table = render(results)
    (folder / "amqp_delayed.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
