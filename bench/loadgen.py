"""A small HTTP/1.1 keep-alive load generator (asyncio, raw sockets), run as its own process.

``python -m bench.loadgen --port 8000 --path /emit:28 --path /probe:4 --duration 4``
prints one JSON object: per path the request count, req/s and latency percentiles. With
``--post-json '{"email": "u-{n}@example.com"}'`` each request is a POST of that JSON, ``{n}`` a
number unique to the request (the outbox bench's users are unique by email). With
``--pause-url`` it sends ``CLIENT PAUSE`` to that Redis ``--pause-at`` seconds into the run, and
reports latencies of requests that overlapped the pause separately. Bounded: it stops after
``--warmup + --duration`` seconds (each request has a 30 s timeout).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import time
import uuid
from typing import Any

from bench.common import percentile

__all__ = ("main",)

REQUEST_TIMEOUT_S = 30.0


class PathStats:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.starts: list[float] = []
        self.errors = 0
        self.total = 0
        """Requests including the warm-up (for CPU time per request)."""


_unique = itertools.count()
_run_id = uuid.uuid4().hex[:8]


def _post(host: str, path: str, template: str) -> bytes:
    body = template.replace("{n}", f"{_run_id}-{next(_unique)}").encode()
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: bench\r\nContent-Type: application/json\r\n"
    return head.encode() + b"Content-Length: %d\r\n\r\n" % len(body) + body


async def _connection(
    host: str,
    port: int,
    path: str,
    stats: PathStats,
    t0: float,
    record_from: float,
    deadline: float,
    post_json: str | None = None,
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: bench\r\n\r\n".encode()
    try:
        while True:
            start = time.perf_counter()
            if start >= deadline:
                return
            writer.write(request if post_json is None else _post(host, path, post_json))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_S)
            lowered = head.lower()
            i = lowered.find(b"content-length:")
            length = int(lowered[i + 15 : lowered.find(b"\r\n", i)]) if i >= 0 else 0
            if length:
                await reader.readexactly(length)
            end = time.perf_counter()
            stats.total += 1
            if start >= record_from:
                if head[9:10] != b"2":
                    stats.errors += 1
                stats.latencies.append(end - start)
                stats.starts.append(start - t0)
    finally:
        writer.close()


def _pause(url: str, ms: int) -> None:
    import redis

    redis.Redis.from_url(url, socket_timeout=5).execute_command("CLIENT", "PAUSE", ms, "ALL")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    paths: dict[str, int] = {}
    for spec in args.path:
        path, _, count = spec.partition(":")
        paths[path] = int(count or args.connections)
    stats = {path: PathStats() for path in paths}
    t0 = time.perf_counter()
    record_from = t0 + args.warmup
    deadline = record_from + args.duration
    tasks = [
        asyncio.create_task(
            _connection(args.host, args.port, path, stats[path], record_from, record_from, deadline, args.post_json)
        )
        for path, count in paths.items()
        for _ in range(count)
    ]
    paused_at = None
    if args.pause_url:
        await asyncio.sleep(max(0.0, record_from + args.pause_at - time.perf_counter()))
        paused_at = time.perf_counter() - record_from
        _pause(args.pause_url, args.pause_ms)
    await asyncio.gather(*tasks)
    result: dict[str, Any] = {"duration_s": args.duration, "paths": {}}
    for path, st in stats.items():
        lat_ms = [x * 1000 for x in st.latencies]
        entry: dict[str, Any] = {
            "requests": len(lat_ms),
            "total_requests": st.total,
            "errors": st.errors,
            "rps": len(lat_ms) / args.duration,
            "p50_ms": percentile(lat_ms, 50),
            "p99_ms": percentile(lat_ms, 99),
            "max_ms": max(lat_ms, default=float("nan")),
            "over_100ms": sum(1 for x in lat_ms if x > 100),
        }
        if paused_at is not None:
            lo, hi = paused_at, paused_at + args.pause_ms / 1000
            window = [lat for lat, s in zip(lat_ms, st.starts, strict=True) if s <= hi and s + lat / 1000 >= lo]
            entry["pause_window"] = {
                "requests": len(window),
                "p99_ms": percentile(window, 99),
                "max_ms": max(window, default=float("nan")),
            }
        result["paths"][path] = entry
    if paused_at is not None:
        result["paused_at_s"] = paused_at
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", action="append", required=True, help="PATH[:connections]")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--post-json", help="POST this JSON; {n} becomes a number unique to each request")
    parser.add_argument("--pause-url")
    parser.add_argument("--pause-at", type=float, default=2.0)
    parser.add_argument("--pause-ms", type=int, default=3000)
    args = parser.parse_args(argv)
    json.dump(asyncio.run(run(args)), sys.stdout)


if __name__ == "__main__":
    main()
