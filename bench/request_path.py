"""Request path and broker stall: uvicorn (one worker) serving the benchmark apps, loaded on loopback.

Variants, side by side in each repetition (the two runs of each ratio next to each other):

- ``none``: ``GET /noemit`` on the events app (the denominator of every ratio);
- ``events``: ``GET /emit`` calling ``request.app.emit`` with ``CeleryEventsPlugin``;
- ``naive``: ``GET /naive`` calling Celery's ``apply_async`` inside the async handler;
- ``naive_pool``: ``GET /naive-pool`` handing ``apply_async`` to a thread pool (not awaited);
- ``simple_none`` / ``simple``: the same two routes on Litestar's ``SimpleEventEmitter``.

After each emitting run the emitted events are counted in the broker (a fast handler in front
of a growing in-memory backlog is not a result). The stall benchmark pauses the private Redis
for 3 s (``CLIENT PAUSE``) under load and watches a route that never touches Redis.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psutil

from bench.apps import NAIVE_QUEUE, WEB_QUEUE
from bench.common import ROOT, RedisServer, free_port, port_open, ratio, summary, wait_for

__all__ = ("run_request_path", "run_stall", "servers")

CONNECTIONS = 32
BROKER_GRACE_S = 5.0
WARMUP_S = 1.0


@contextmanager
def _server(factory: str, redis_url: str) -> Iterator[tuple[int, int]]:
    port = free_port()
    env = {
        **os.environ,
        "BENCH_REDIS_URL": redis_url,
        "BENCH_EVENTS_QUEUE": WEB_QUEUE,
        "BENCH_DATA_DIR": tempfile.mkdtemp(prefix="bench-web-"),
    }
    cmd = [sys.executable, "-m", "uvicorn", "--factory", factory, "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--workers", "1", "--log-level", "warning", "--no-access-log"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    try:
        wait_for(lambda: port_open(port), timeout=30, what=f"uvicorn {factory}", interval=0.1)
        yield port, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextmanager
def servers(redis_url: str) -> Iterator[dict[str, tuple[int, int]]]:
    """Both apps, each in its own uvicorn process; yields their ports and process ids."""
    with (
        _server("bench.apps:create_events_app", redis_url) as events,
        _server("bench.apps:create_simple_app", redis_url) as simple,
    ):
        yield {"events": events, "simple": simple}


def _get(port: int, path: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def _cpu_s(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def load(
    server: tuple[int, int],
    paths: list[str],
    duration: float,
    warmup: float = 0.5,
    connections: int = CONNECTIONS,
    **options: Any,
) -> dict[str, Any]:
    """Run the load generator against ``server`` (port, pid); add the server's CPU time per request.
    ``options``: more of ``bench.loadgen``'s flags (``pause_url=...`` is ``--pause-url ...``)."""
    port, pid = server
    cpu = _cpu_s(pid)
    cmd = [sys.executable, "-m", "bench.loadgen", "--port", str(port), "--duration", str(duration)]
    cmd += ["--warmup", str(warmup), "--connections", str(connections)]
    for path in paths:
        cmd += ["--path", path]
    for key, value in options.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=duration + warmup + 60, check=True)
    result: dict[str, Any] = json.loads(out.stdout)
    total = sum(p["total_requests"] for p in result["paths"].values())
    result["server_cpu_us_per_request"] = (_cpu_s(pid) - cpu) / max(1, total) * 1e6
    return result


def _in_broker(redis: RedisServer, queue: str, emitted: int, grace_s: float = BROKER_GRACE_S) -> dict[str, Any]:
    """How many emitted events reached the broker within ``grace_s`` after the load ended."""
    client = redis.client()
    start = time.monotonic()
    count = 0
    while time.monotonic() - start < grace_s:
        count = int(client.llen(queue))
        if count >= emitted:
            break
        time.sleep(0.01)
    return {"in_broker": count, "after_s": round(time.monotonic() - start, 3), "all": count >= emitted}


VARIANTS = {
    # name: (server, path, broker queue or None); pairs of a ratio sit next to each other.
    "none": ("events", "/noemit", None),
    "events": ("events", "/emit", WEB_QUEUE),
    "simple_none": ("simple", "/noemit", None),
    "simple": ("simple", "/emit", None),
    "naive": ("events", "/naive", NAIVE_QUEUE),
    "naive_pool": ("events", "/naive-pool", NAIVE_QUEUE),
}


def run_request_path(
    redis: RedisServer, ports: dict[str, tuple[int, int]], reps: int, duration: float, variants: list[str] | None = None
) -> dict[str, Any]:
    client = redis.client()
    names = variants or list(VARIANTS)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for name in names:  # unmeasured: each route once through every code path and cache before the first pair
        server, path, _ = VARIANTS[name]
        load(ports[server], [path], WARMUP_S)
    for rep in range(reps):
        # Each ratio's two runs stay next to each other (the machine's load drifts); which of the two
        # goes first alternates per repetition.
        order = (
            names if rep % 2 == 0 else [names[i ^ 1] if (i ^ 1) < len(names) else names[i] for i in range(len(names))]
        )
        for name in order:
            server, path, queue = VARIANTS[name]
            port = ports[server][0]
            _get(port, "/stats")
            client.delete(WEB_QUEUE, NAIVE_QUEUE)
            loaded = load(ports[server], [path], duration)
            result = loaded["paths"][path]
            result["server_cpu_us_per_request"] = loaded["server_cpu_us_per_request"]
            stats = _get(port, "/stats") if name not in ("none", "simple_none") else {}
            if queue is not None:
                # The pool variant still holds a backlog: count what the pool published in the grace time.
                result["broker"] = _in_broker(redis, queue, stats["emitted"])
            result["stats"] = stats
            runs[name].append(result)
    client.delete(WEB_QUEUE, NAIVE_QUEUE)
    rps = {name: [r["rps"] for r in runs[name]] for name in names}
    ratios = {"events": "none", "naive": "none", "naive_pool": "none", "simple": "simple_none"}
    emitting = [name for name in ("events", "naive", "naive_pool", "simple") if name in names]
    return {
        "connections": CONNECTIONS,
        "duration_s": duration,
        "reps": reps,
        "rps": {name: summary(values) for name, values in rps.items()},
        "ratio": {name: ratio(rps[name], rps[ratios[name]]) for name in emitting if ratios[name] in names},
        "server_cpu_us_per_request": {
            name: summary([r["server_cpu_us_per_request"] for r in runs[name]]) for name in names
        },
        "cpu_ratio": {
            name: ratio(
                [r["server_cpu_us_per_request"] for r in runs[ratios[name]]],
                [r["server_cpu_us_per_request"] for r in runs[name]],
            )
            for name in emitting
            if ratios[name] in names
        },
        "emit_p50_us": {name: summary([r["stats"]["emit_p50_us"] for r in runs[name]]) for name in emitting},
        "latency_p50_ms": {name: summary([r["p50_ms"] for r in runs[name]]) for name in names},
        "latency_p99_ms": {name: summary([r["p99_ms"] for r in runs[name]]) for name in names},
        "broker": {
            name: [
                {"emitted": r["stats"]["emitted"], **r["broker"], "pool_backlog": r["stats"]["pool_backlog"]}
                for r in runs[name]
            ]
            for name in emitting
            if "broker" in runs[name][0]
        },
        "runs": runs,
    }


STALL_DURATION_S = 8.0
STALL_PAUSE = {"pause_at": 2.5, "pause_ms": 3000}


def run_stall(redis: RedisServer, ports: dict[str, tuple[int, int]], reps: int = 2) -> dict[str, Any]:
    """Unpaused, paused, and the naive bridge paused, ``reps`` times; the summary keeps the worst case."""
    client = redis.client()
    port = ports["events"][0]
    pause = {"pause_url": redis.url, **STALL_PAUSE}
    out: dict[str, Any] = {"duration_s": STALL_DURATION_S, **STALL_PAUSE, "connections": "28 emitting + 4 probe"}
    runs: dict[str, list[dict[str, Any]]] = {"events_unpaused": [], "events_paused": [], "naive_paused": []}
    for _ in range(reps):
        for name, route, queue, paused in (
            ("events_unpaused", "/emit", WEB_QUEUE, False),
            ("events_paused", "/emit", WEB_QUEUE, True),
            ("naive_paused", "/naive", NAIVE_QUEUE, True),
        ):
            _get(port, "/stats")
            client.delete(WEB_QUEUE, NAIVE_QUEUE)
            result = load(ports["events"], [f"{route}:28", "/probe:4"], STALL_DURATION_S, **(pause if paused else {}))
            if paused:
                time.sleep(0.2 + max(0.0, STALL_PAUSE["pause_at"] + STALL_PAUSE["pause_ms"] / 1000 - STALL_DURATION_S))
            stats = _get(port, "/stats")
            result["stats"] = stats
            result["broker"] = _in_broker(redis, queue, stats["emitted"], grace_s=15.0)
            runs[name].append(result)
    client.delete(WEB_QUEUE, NAIVE_QUEUE)
    out.update(runs)
    unpaused = [r["paths"]["/emit"]["p99_ms"] for r in runs["events_unpaused"]]
    paused = runs["events_paused"]
    naive = runs["naive_paused"]
    paused_p99 = [r["paths"]["/emit"]["p99_ms"] for r in paused]
    out["summary"] = {
        "reps": reps,
        "probe_over_100ms": max(r["paths"]["/probe"]["over_100ms"] for r in paused),
        "probe_max_ms": max(r["paths"]["/probe"]["max_ms"] for r in paused),
        "emit_p99_unpaused_ms": max(unpaused),
        "emit_p99_paused_ms": max(paused_p99),
        "emit_p99_ratio": max(p / u for p, u in zip(paused_p99, unpaused, strict=True)),
        "emit_p99_pause_window_ms": max(r["paths"]["/emit"]["pause_window"]["p99_ms"] for r in paused),
        "all_delivered": all(r["broker"]["all"] for r in paused),
        "emitted": sum(r["stats"]["emitted"] for r in paused),
        "in_broker": sum(r["broker"]["in_broker"] for r in paused),
        "naive_probe_over_100ms": max(r["paths"]["/probe"]["over_100ms"] for r in naive),
        "naive_probe_max_ms": max(r["paths"]["/probe"]["max_ms"] for r in naive),
        "naive_emit_p99_ms": max(r["paths"]["/naive"]["p99_ms"] for r in naive),
    }
    return out
