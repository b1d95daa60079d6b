"""Scale-out on this machine: events/s with 1, 2 and 4 worker processes, the brokers' own ceiling,
and the bytes each delayed / failed event costs in Redis.

``python -m bench.scaling [--reps N] [--n N]`` writes ``bench/results/scaling.{json,md}``; the bench
runner calls ``run(results)`` (``python -m bench --only scaling``). Redis: a private redis-server.
RabbitMQ: 127.0.0.1:5672, a queue and delay-level prefix unique to the run, deleted at the end.

- drain: N no-op events queued by this library's publisher, drained by 1, 2 or 4 ``celery -A worker
  worker -P prefork -c 1`` processes; the rate between the first and the last ``skip`` messages.
- publish: events/s this library's publisher gets acknowledged (no workers), with the broker
  process's CPU share meanwhile (Redis only: its pid is ours), so the broker's ceiling per core is
  ``events/s / cpu share`` (an extrapolation, said so in the table).
- memory: INFO used_memory delta for N events scheduled an hour ahead (delayed store) and N records
  in the failed store, per event.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kombu import Connection
from litestar import Litestar

from bench.common import ROOT, CeleryWorker, RedisServer, machine, summary, versions, wait_for
from litestar_celery_events import CeleryEventEmitter, CeleryEventsConfig, CeleryEventsPlugin, emit_later, listener
from litestar_celery_events.transports.amqp_delay import DelayLevels

__all__ = ("create_app", "run")

AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
WORKER_COUNTS = (1, 2, 4)


@listener("bench_scale")
def on_scale(**kwargs: Any) -> None:
    pass


def create_app() -> Litestar:
    """The workers' and the publisher's app, on the broker named by env BENCH_BROKER_URL."""
    config = CeleryEventsConfig(
        broker_url=os.environ["BENCH_BROKER_URL"],
        default_queue=os.environ["BENCH_QUEUE"],
        data_dir=os.environ.get("CELERY_EVENTS_DATA_DIR"),
        max_buffered_events=250_000,
        celery_config={"celery_events_delay_prefix": os.environ["BENCH_DELAY_PREFIX"]},
    )
    return Litestar(listeners=[on_scale], plugins=[CeleryEventsPlugin(config)])


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _beam_pid() -> int | None:
    """RabbitMQ's Erlang VM on this machine (shared with other users: its CPU share is an upper bound)."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if (proc / "comm").read_text().strip() == "beam.smp":
                    return int(proc.name)
            except OSError:
                continue
    return None


def _publish(emitter: CeleryEventEmitter, n: int) -> float:
    target = emitter.publisher.published + n
    start = time.perf_counter()
    for i in range(n):
        emitter.emit("bench_scale", n=i)
    wait_for(lambda: emitter.publisher.published >= target, 120, "the publisher to send every event", 0.005)
    return n / (time.perf_counter() - start)


def _drain(emitter: CeleryEventEmitter, depth: Callable[[], int], n: int, skip: int) -> float:
    target = emitter.publisher.published + n
    for i in range(n):
        emitter.emit("bench_scale", n=i)
    t0 = wait_for(lambda: emitter.publisher.published >= target - n + skip and time.perf_counter(), 60, "fill", 0.002)
    wait_for(lambda: emitter.publisher.published >= target, 120, "the publisher to send every event", 0.002)
    t1 = wait_for(lambda: depth() <= skip and time.perf_counter(), 180, "the workers to drain", 0.002)
    wait_for(lambda: depth() == 0, 60, "the queue to empty", 0.01)
    return (n - 2 * skip) / (t1 - t0)


def _workers(count: int, env: dict[str, str], folder: Path) -> list[CeleryWorker]:
    args = ["-P", "prefork", "-c", "1", "-Q", env["BENCH_QUEUE"], "--loglevel", "INFO"]
    args += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    made = []
    for i in range(count):
        name = ["--hostname", f"scale{i}-{uuid.uuid4().hex[:6]}@%h"]
        made.append(CeleryWorker("worker", [*args, *name], env, folder / f"w{count}-{i}.log"))
    return made


def _broker_side(
    env: dict[str, str], folder: Path, depth: Callable[[], int], pid: int | None, reps: int, n: int
) -> dict[str, Any]:
    os.environ.update(env)
    app = create_app()
    emitter = app.event_emitter
    assert isinstance(emitter, CeleryEventEmitter)
    out: dict[str, Any] = {"drain_events_per_s": {}, "drain_per_worker": {}}
    emitter.start()
    try:
        rates, shares = [], []
        for _ in range(reps):
            cpu0, wall0 = (_cpu_s(pid) if pid else 0.0), time.perf_counter()
            rates.append(_publish(emitter, n * 10))  # long enough for the CPU clock's 10 ms ticks
            if pid:
                shares.append((_cpu_s(pid) - cpu0) / (time.perf_counter() - wall0))
        wait_for(lambda: depth() == n * 10 * reps, 60, "every published event in the queue", 0.05)
        out["publish_events_per_s"] = summary(rates)
        if shares:
            out["broker_cpu_share_while_publishing"] = summary(shares)
            out["broker_ceiling_per_core_extrapolated"] = summary(
                [r / s for r, s in zip(rates, shares, strict=True) if s]
            )
        for count in WORKER_COUNTS:
            workers = _workers(count, env, folder)
            try:
                for w in workers:
                    w.wait_ready(120)
                wait_for(lambda: depth() == 0, 180, "the workers to drain the publish backlog", 0.05)
                drained = []
                for _ in range(reps):
                    cpu0, wall0 = (_cpu_s(pid) if pid else 0.0), time.perf_counter()
                    drained.append(_drain(emitter, depth, n, n // 10))
                    if pid and count == WORKER_COUNTS[-1]:
                        out.setdefault("broker_cpu_share_drain_4", []).append(
                            round((_cpu_s(pid) - cpu0) / (time.perf_counter() - wall0), 3)
                        )
                out["drain_events_per_s"][str(count)] = summary(drained)
                out["drain_per_worker"][str(count)] = round(summary(drained)["median"] / count, 1)
            finally:
                for w in workers:
                    w.stop()
    finally:
        emitter.stop()
    return out


def _memory(server: RedisServer, n: int) -> dict[str, Any]:
    from litestar_celery_events.brokers.redis import redis_settings_for_url
    from litestar_celery_events.contract.failures import ListenerFailure
    from litestar_celery_events.stores.failed import RedisFailedStore

    client = server.client()
    out: dict[str, Any] = {"n": n}
    app = create_app()
    emitter = app.event_emitter
    assert isinstance(emitter, CeleryEventEmitter)
    emitter.start()
    try:
        before = int(client.info("memory")["used_memory"])
        for i in range(n):
            emit_later(app, "bench_scale", n=i, email="user@example.com", delay=3600)
        wait_for(lambda: emitter.publisher.pending == 0, 120, "every delayed event stored", 0.05)
        after = int(client.info("memory")["used_memory"])
    finally:
        emitter.stop()
    keys = {k.decode(): client.type(k).decode() for k in client.scan_iter(count=1000)}
    out["delayed_keys"] = {k: [t, client.memory_usage(k, samples=0)] for k, t in keys.items()}
    out["delayed_bytes_per_event"] = round((after - before) / n, 1)
    store = RedisFailedStore(redis_settings_for_url(server.url).open(), "bench-scale:failed")
    before = int(client.info("memory")["used_memory"])
    for i in range(n):
        store.add(
            ListenerFailure(
                event_id="bench_scale",
                emission_id=uuid.uuid4().hex,
                listener="bench.apps:on_scale",
                args=[],
                kwargs={"n": i, "email": "user@example.com"},
                exc_type="ValueError",
                message="bench failure",
                traceback="Traceback (most recent call last):\n  ...\nValueError: bench failure\n",
                attempts=4,
                permanent=False,
            )
        )
    out["failed_bytes_per_record"] = round((int(client.info("memory")["used_memory"]) - before) / n, 1)
    store.close()
    return out


def _delete_delay_levels(channel: Any, prefix: str) -> None:
    """The delay levels the workers declared at start-up under this run's prefix (empty: no delayed events)."""
    levels = DelayLevels(prefix)
    for name in levels.names():
        if name != levels.delivery_exchange:
            channel.queue_delete(name)
        channel.exchange_delete(name)


def run(results: dict[str, Any], reps: int = 3, n: int = 2_000, memory_n: int = 20_000) -> None:
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
    out: dict[str, Any] = {
        "worker_counts": list(WORKER_COUNTS),
        "n": n,
        "reps": reps,
        "load_before": machine()["load_avg"],
    }
    with RedisServer() as server, tempfile.TemporaryDirectory(prefix="bench-scaling-") as folder:
        tmp = Path(folder)
        base = {"LITESTAR_APP": "bench.scaling:create_app", "CELERY_EVENTS_DATA_DIR": str(tmp / "data")}
        base["BENCH_DELAY_PREFIX"] = f"bench-scale-{tag}"
        redis_env = {**base, "BENCH_BROKER_URL": server.url, "CELERY_BROKER_URL": server.url}
        redis_env["BENCH_QUEUE"] = f"bench-scale-{tag}"
        client = server.client()
        pid = int(client.info("server")["process_id"])
        out["redis"] = _broker_side(redis_env, tmp, lambda: int(client.llen(redis_env["BENCH_QUEUE"])), pid, reps, n)
        client.flushall()
        out["memory"] = _memory(server, memory_n)
        amqp_env = {**base, "BENCH_BROKER_URL": AMQP_URL, "CELERY_BROKER_URL": AMQP_URL}
        amqp_env["BENCH_QUEUE"] = f"bench-scale-amqp-{tag}"
        with Connection(AMQP_URL) as connection:
            channel = connection.channel()

            def depth() -> int:
                return int(channel.queue_declare(queue=amqp_env["BENCH_QUEUE"], passive=True).message_count)

            try:
                out["rabbitmq"] = _broker_side(amqp_env, tmp, depth, _beam_pid(), reps, n)
            finally:
                channel.queue_delete(amqp_env["BENCH_QUEUE"])
                channel.exchange_delete(amqp_env["BENCH_QUEUE"])
                _delete_delay_levels(channel, base["BENCH_DELAY_PREFIX"])
    out["load_after"] = machine()["load_avg"]
    results["scaling"] = out


def render(results: dict[str, Any]) -> str:
    s = results["scaling"]
    m = results["machine"]
    lines = [
        f"# Scale-out ({results['command']}, {results['started_at']})",
        "",
        f"{m['cores']} cores ({m['cpu']}), shared with other engineers' runs: load average "
        f"{s['load_before']} before, {s['load_after']} after. Median (min-max) of {s['reps']} repetitions.",
        "",
        "| figure | Redis | RabbitMQ |",
        "| --- | --- | --- |",
    ]

    def cell(side: str, *path: str) -> str:
        node: Any = s.get(side, {})
        for key in path:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict) and node.get("median") is not None:
            return f"{node['median']:,.0f} ({node['min']:,.0f}-{node['max']:,.0f})"
        return "n/a" if node in ({}, None) else str(node)

    lines.append(
        f"| publish only, events/s acknowledged | {cell('redis', 'publish_events_per_s')}"
        f" | {cell('rabbitmq', 'publish_events_per_s')} |"
    )
    lines.append(
        f"| broker process CPU share meanwhile, cores"
        f" | {s['redis'].get('broker_cpu_share_while_publishing', {}).get('median')}"
        f" | {s['rabbitmq'].get('broker_cpu_share_while_publishing', {}).get('median')} (shared broker) |"
    )
    lines.append(
        f"| broker ceiling per core, publish (extrapolated: events/s ÷ CPU share) "
        f"| {cell('redis', 'broker_ceiling_per_core_extrapolated')}"
        f" | {cell('rabbitmq', 'broker_ceiling_per_core_extrapolated')} |"
    )
    for count in s["worker_counts"]:
        c = str(count)
        lines.append(
            f"| drain, {count} worker process(es) (-c 1 each), events/s"
            f" | {cell('redis', 'drain_events_per_s', c)} | {cell('rabbitmq', 'drain_events_per_s', c)} |"
        )
    lines.append(
        f"| broker CPU share draining with 4 workers, per rep | {s['redis'].get('broker_cpu_share_drain_4')}"
        f" | {s['rabbitmq'].get('broker_cpu_share_drain_4')} |"
    )
    mem = s["memory"]
    lines += [
        "",
        f"Delayed store: {mem['delayed_bytes_per_event']} bytes per event scheduled"
        f" (INFO used_memory delta, {mem['n']:,} events); "
        f"failed store: {mem['failed_bytes_per_record']} bytes per record.",
        "",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--n", type=int, default=2_000, help="events per drain repetition")
    options = parser.parse_args()
    started = time.perf_counter()
    results: dict[str, Any] = {
        "command": "python -m bench.scaling " + " ".join(sys.argv[1:]),
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions(),
    }
    run(results, options.reps, options.n)
    results["machine_end"] = machine()
    results["elapsed_s"] = round(time.perf_counter() - started, 1)
    folder = ROOT / "bench" / "results"
    (folder / "scaling.json").write_text(json.dumps(results, indent=1) + "\n")
    table = render(results)
    (folder / "scaling.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
