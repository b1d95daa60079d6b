"""Events and the database transaction: the docs' handler with and without the outbox, side by side.

A real uvicorn runs the docs' handler (advanced-alchemy, autocommit, PostgreSQL via asyncpg), a real
``celery -A worker worker -c 2`` runs a listener that looks the user up in its own session. Per mode
(plain emit, outbox), in one run:

- missing rows: N sequential requests; listener runs that did not find their user;
- rolled back: requests whose handler raises after ``emit``; events delivered for them anyway;
- latency: listener start minus the commit's time (the app logs each commit), p50/p99;
- throughput: requests/s of the docs' handler under 8 keep-alive connections (``bench.loadgen``,
  raw sockets, so the load generator takes little of the machine's CPU), both web
  processes up at once and no worker (the listeners' CPU would land in whichever run follows),
  each with a pool of 8 connections (SQLAlchemy's default of 5 opened and closed a connection
  every ~100 requests in both modes); after an unmeasured 3 s run of each, ``PAIRS`` interleaved
  pairs of 3 s runs (which mode goes first alternates); the median pair ratio.

Then the relay alone: rows/s one process claims, publishes (private Redis) and deletes on PostgreSQL.
``python -m bench.outbox [--n 2000]`` prints JSON; ``make bench`` runs it as the ``outbox`` step.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

from bench.common import CeleryWorker, RedisServer, percentile, wait_for
from bench.request_path import load
from harness import LoggedProcess, free_port, port_open

__all__ = ("run_outbox",)

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
APP = "tests.apps.outbox:create_app"


@contextmanager
def pg_database() -> Iterator[str]:
    from sqlalchemy import create_engine, text

    name = f"bench_outbox_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _fresh_tables(url: str) -> None:
    from advanced_alchemy.base import metadata_registry
    from sqlalchemy import create_engine

    from litestar_celery_events.stores.ledger import ledger_table
    from litestar_celery_events.stores.outbox import outbox_table, sync_url
    from tests.apps.outbox import OutboxProfile, OutboxUser

    metadata = metadata_registry.get(None)
    tables = [OutboxProfile.__table__, OutboxUser.__table__, outbox_table(metadata), ledger_table(metadata)]
    engine = create_engine(sync_url(url))
    metadata.drop_all(engine, tables=tables)
    metadata.create_all(engine, tables=tables)
    engine.dispose()


def _records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _mode(outbox: bool, redis: RedisServer, url: str, n: int, rolled_back: int, folder: Path) -> dict[str, Any]:
    import httpx

    _fresh_tables(url)
    records, commits = folder / "records.jsonl", folder / "commits.jsonl"
    env = {
        "CELERY_BROKER_URL": redis.url,
        "LITESTAR_APP": APP,
        "OUTBOX_DB_URL": url,
        "OUTBOX": "1" if outbox else "0",
        "RECORD_FILE": str(records),
        "COMMIT_LOG": str(commits),
        "TEST_QUEUE": f"bench-outbox-{uuid.uuid4().hex[:6]}",
        "CELERY_EVENTS_DATA_DIR": str(folder / "data"),
        **{k: os.environ[k] for k in ("LEDGER",) if k in os.environ},
    }
    worker = CeleryWorker(
        "worker",
        [
            "--concurrency",
            "2",
            "--queues",
            env["TEST_QUEUE"],
            "--without-gossip",
            "--without-mingle",
            "--loglevel",
            "INFO",
        ],
        env,
        folder / "worker.log",
    )
    web, port = _start_web(env, folder / "web.log")
    try:
        worker.wait_output("ready", 90)
        wait_for(lambda: port_open(port), timeout=60, what="uvicorn")
        base = f"http://127.0.0.1:{port}/users"
        server = psutil.Process(web.proc.pid)
        with httpx.Client(timeout=30) as client:
            cpu = _cpu_s(server)
            for i in range(n):
                client.post(base, json={"email": f"seq-{i}@example.com"})
            sequential_cpu_us = (_cpu_s(server) - cpu) / n * 1e6
            for i in range(rolled_back):
                client.post(base, json={"email": f"raise-{i}@example.com", "mode": "raise"})
            client.post(base, json={"email": "last@example.com"})
        wait_for(
            lambda: any(r["email"] == "last@example.com" for r in _records(records)), timeout=300, what="last event"
        )
        wait_for(
            lambda: len([r for r in _records(records) if r["email"].startswith("seq-")]) >= n,
            timeout=300,
            what="every sequential event",
        )
        runs = [r for r in _records(records) if r["email"].startswith("seq-")]
        committed = {c["email"]: c["at"] for c in _records(commits)}
        latency_ms = [(r["started"] - committed[r["email"]]) * 1000 for r in runs if r["email"] in committed]
        ghosts = [r for r in _records(records) if r["email"].startswith("raise-")]
    finally:
        web.stop()
        worker.stop()
    return {
        "requests": n,
        "listener_runs": len(runs),
        "runs_missing_their_row": sum(1 for r in runs if not r["found"]),
        "runs_started_before_commit": sum(1 for v in latency_ms if v < 0),
        "rolled_back_requests": rolled_back,
        "events_delivered_for_rolled_back": len(ghosts),
        "commit_to_listener_ms": {"p50": percentile(latency_ms, 50), "p99": percentile(latency_ms, 99)},
        "server_cpu_us_per_request": {"sequential": sequential_cpu_us},
    }


PAIRS = 9
PAIR_RUN_S = 3.0
CLIENTS = 8
USER_JSON = '{"email": "load-{n}@example.com"}'


def _start_web(env: dict[str, str], log: Path) -> tuple[LoggedProcess, int]:
    """A uvicorn serving the docs' handler; returns it and its port."""
    port = free_port()
    cmd = [sys.executable, "-m", "uvicorn", APP, "--factory", "--port", str(port)]
    return LoggedProcess([*cmd, "--log-level", "warning", "--no-access-log"], env, log), port


def _load_web(outbox: bool, redis: RedisServer, url: str, folder: Path) -> tuple[LoggedProcess, int]:
    env = {
        "CELERY_BROKER_URL": redis.url,
        "LITESTAR_APP": APP,
        "OUTBOX_DB_URL": url,
        "OUTBOX": "1" if outbox else "0",
        "OUTBOX_POOL_SIZE": str(CLIENTS),  # a connection per client: none opened and closed per burst
        "RECORD_FILE": str(folder / "records.jsonl"),
        "TEST_QUEUE": f"bench-outbox-load-{int(outbox)}-{uuid.uuid4().hex[:6]}",
        "CELERY_EVENTS_DATA_DIR": str(folder / f"data-{int(outbox)}"),
    }
    return _start_web(env, folder / f"web-{int(outbox)}.log")


def _throughput_pairs(redis: RedisServer, url: str, folder: Path) -> dict[str, Any]:
    """Both web processes up, no worker; ``PAIRS`` interleaved pairs of ``PAIR_RUN_S`` runs."""
    _fresh_tables(url)
    webs = {"outbox": _load_web(True, redis, url, folder), "plain_emit": _load_web(False, redis, url, folder)}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in webs}
    try:
        for _, port in webs.values():
            wait_for(functools.partial(port_open, port), timeout=60, what="uvicorn")
        for web, port in webs.values():  # unmeasured: each pool's connections opened, statements prepared
            load((port, web.proc.pid), ["/users"], PAIR_RUN_S, connections=CLIENTS, post_json=USER_JSON)
        for pair in range(PAIRS):
            for name in ("outbox", "plain_emit") if pair % 2 == 0 else ("plain_emit", "outbox"):
                web, port = webs[name]
                loaded = load((port, web.proc.pid), ["/users"], PAIR_RUN_S, connections=CLIENTS, post_json=USER_JSON)
                result = loaded["paths"]["/users"]
                if result["errors"]:
                    raise RuntimeError(f"{name}: {result['errors']} failed requests (see {folder})")
                runs[name].append({"rps": result["rps"], "cpu_us_per_request": loaded["server_cpu_us_per_request"]})
    finally:
        for web, _ in webs.values():
            web.stop()
    ratios = [o["rps"] / p["rps"] for o, p in zip(runs["outbox"], runs["plain_emit"], strict=True)]
    cpu_ratios = [
        p["cpu_us_per_request"] / o["cpu_us_per_request"]
        for o, p in zip(runs["outbox"], runs["plain_emit"], strict=True)
    ]
    return {"pairs": PAIRS, "run_s": PAIR_RUN_S, "runs": runs, "ratios": ratios, "cpu_ratios": cpu_ratios}


def _cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def _relay_throughput(redis: RedisServer, url: str, rows: int) -> dict[str, Any]:
    """One process: claim + publish (pipelined to Redis) + delete, batches of 1000, until the table is empty."""
    from advanced_alchemy.base import metadata_registry
    from celery import Celery

    from litestar_celery_events.config import CeleryEventsConfig
    from litestar_celery_events.contract.message import Emission
    from litestar_celery_events.outbox.relay import OutboxRelay
    from litestar_celery_events.stores.outbox import OutboxStore, outbox_table, write_rows
    from litestar_celery_events.transports import transport_for

    _fresh_tables(url)
    table = outbox_table(metadata_registry.get(None))
    store = OutboxStore.from_url(url, table)
    body = b'[[],{"email":"relay@example.com"},{"callbacks":null,"errbacks":null,"chain":null,"chord":null}]'
    emissions = [
        Emission(
            "user_created",
            str(uuid.uuid4()),
            "events.user_created",
            body,
            (),
            {"email": "relay@example.com"},
            queue="bench-relay",
            emitted_at=time.time(),
        )
        for _ in range(rows)
    ]
    with store.engine.begin() as conn:
        for start in range(0, rows, 1000):
            write_rows(conn, table, emissions[start : start + 1000], "dead-host:1:bench", lease_s=-1.0)
    config = CeleryEventsConfig(broker_url=redis.url)
    celery_app = Celery(broker=redis.url, set_as_current=False)
    refused: list[Any] = []
    relay = OutboxRelay(
        lambda: store, 1000, config, lambda: transport_for(celery_app), lambda e, why: refused.append(e)
    )
    relay.owner = "bench-relay"
    import logging

    logging.getLogger("litestar_celery_events.outbox").setLevel(logging.ERROR)  # one warning per batch otherwise
    started, cpu = time.perf_counter(), time.process_time()
    relayed = 0
    while count := relay.relay_once():
        relayed += count
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    queued = int(redis.client().llen("bench-relay"))
    store.close()
    return {
        "rows": rows,
        "relayed": relayed,
        "in_redis": queued,
        "seconds": elapsed,
        "rows_per_s": relayed / elapsed,
        "rows_per_cpu_s": relayed / cpu,  # the relay process's own CPU (PostgreSQL's and Redis's not counted)
    }


def _publish_after_commit(redis: RedisServer, url: str, outbox: bool, n: int, folder: Path) -> dict[str, float]:
    """In one process (Litestar's TestClient): when each event reaches the broker, minus its commit.

    The web side's share of commit -> listener start, without the worker and the machine's scheduling."""
    import logging

    from litestar.testing import TestClient

    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    _fresh_tables(url)
    commits = folder / f"commits-{int(outbox)}.jsonl"
    env = {
        "CELERY_BROKER_URL": redis.url,
        "OUTBOX_DB_URL": url,
        "OUTBOX": "1" if outbox else "0",
        "RECORD_FILE": str(folder / "records.jsonl"),
        "COMMIT_LOG": str(commits),
        "TEST_QUEUE": f"bench-outbox-probe-{uuid.uuid4().hex[:6]}",
        "CELERY_EVENTS_DATA_DIR": str(folder / "data"),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        from tests.apps.outbox import create_app

        app = create_app()
        publisher = app.event_emitter.publisher  # type: ignore[attr-defined]
        sent: dict[str, float] = {}
        report = publisher._report_published

        def timed(batch: list[Any]) -> None:  # the broker acknowledged them (event loop or thread)
            now = time.time()
            sent.update((e.kwargs["email"], now) for e in batch)
            report(batch)

        publisher._report_published = timed
        with TestClient(app) as client:
            for i in range(n):
                client.post("/users", json={"email": f"probe-{i}@example.com"})
            wait_for(lambda: len(sent) >= n, timeout=60, what="every event published")
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    committed = {c["email"]: c["at"] for c in _records(commits)}
    gaps = [(sent[e] - at) * 1000 for e, at in committed.items() if e in sent]
    return {"p50": percentile(gaps, 50), "p99": percentile(gaps, 99)}


def run_outbox(n: int = 2_000, rolled_back: int = 200, relay_rows: int = 20_000) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with RedisServer() as redis, pg_database() as url:
        for name, outbox in (("plain_emit", False), ("outbox", True)):
            with tempfile.TemporaryDirectory(prefix=f"bench-outbox-{name}-") as folder:
                results[name] = _mode(outbox, redis, url, n, rolled_back, Path(folder))
        with tempfile.TemporaryDirectory(prefix="bench-outbox-probe-") as folder:
            results["publish_after_commit_ms"] = {
                name: _publish_after_commit(redis, url, outbox, 500, Path(folder))
                for name, outbox in (("plain_emit", False), ("outbox", True))
            }
        with tempfile.TemporaryDirectory(prefix="bench-outbox-load-") as folder:
            load = results["throughput"] = _throughput_pairs(redis, url, Path(folder))
        results["relay"] = _relay_throughput(redis, url.replace("+asyncpg", "+psycopg"), relay_rows)
    plain, with_outbox = results["plain_emit"], results["outbox"]
    for name in ("plain_emit", "outbox"):
        results[name]["requests_per_s"] = statistics.median(r["rps"] for r in load["runs"][name])
        results[name]["server_cpu_us_per_request"]["concurrent"] = statistics.median(
            r["cpu_us_per_request"] for r in load["runs"][name]
        )
    results["throughput_ratio"] = statistics.median(load["ratios"])
    # The same by the web process's CPU per request (robust to other work on the machine): plain ÷ outbox.
    results["cpu_throughput_ratio"] = {
        phase: plain["server_cpu_us_per_request"][phase] / with_outbox["server_cpu_us_per_request"][phase]
        for phase in ("sequential", "concurrent")
    }
    results["p50_added_ms"] = with_outbox["commit_to_listener_ms"]["p50"] - plain["commit_to_listener_ms"]["p50"]
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.outbox", description=__doc__)
    parser.add_argument("--n", type=int, default=2_000)
    parser.add_argument("--rolled-back", type=int, default=200)
    parser.add_argument("--relay-rows", type=int, default=20_000)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    os.environ.setdefault("PYTHONPATH", str(Path(__file__).resolve().parent.parent))
    results = run_outbox(args.n, args.rolled_back, args.relay_rows)
    text = json.dumps(results, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
