"""Web-process memory while the broker is down: 1,000 events/s, Redis killed for 30 s, then back.

Each variant runs in a fresh process (``python -m bench.memory <variant>``) with its own
``redis-server`` (append-only file on, so the restart keeps what was queued): ``memory`` is the
default bounded in-memory buffer, ``spool`` the durable on-disk spool (``spool=True``). The process
samples its own RSS every 100 ms; afterwards every emitted event must be in the broker.

Flat means the growth stops: with the spool, the second half of the outage must add under 1 MB
(the first seconds warm up SQLite's page cache and the allocator; a leak would keep growing).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import psutil

from bench.common import ROOT, RedisServer, wait_for

__all__ = ("run_memory",)

RATE = 1000
UP_S, DOWN_S, AFTER_S = 3.0, 30.0, 4.0
FLAT_MB = 1.0
QUEUE = "bench-memory"


def _child(variant: str) -> dict[str, Any]:
    redis = RedisServer(appendonly=True).start()
    os.environ["BENCH_REDIS_URL"] = redis.url
    os.environ["BENCH_DATA_DIR"] = tempfile.mkdtemp(prefix="bench-memory-")
    from bench.apps import create_events_app

    app = create_events_app(queue=QUEUE)
    emitter = app.event_emitter
    emitter.config.spool = variant == "spool"
    emitter.publisher = type(emitter.publisher)(emitter.celery_app, emitter.config)
    process = psutil.Process()
    samples: list[tuple[float, float, int]] = []
    stop = threading.Event()
    t0 = time.perf_counter()

    def sample() -> None:
        while not stop.wait(0.1):
            waiting = emitter.publisher.pending + getattr(emitter.publisher, "spooled", 0)
            samples.append((time.perf_counter() - t0, process.memory_info().rss / 2**20, waiting))

    emitter.start()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    phases = {"up": UP_S, "down": UP_S + DOWN_S, "end": UP_S + DOWN_S + AFTER_S}
    emitted = 0
    killed = restarted = False
    while True:
        now = time.perf_counter() - t0
        if now >= phases["end"]:
            break
        if not killed and now >= phases["up"]:
            redis.kill()
            killed = True
        if killed and not restarted and now >= phases["down"]:
            redis.start()
            restarted = True
        due = int(now * RATE)
        while emitted < due:
            emitter.emit("user_created", email="user@example.com", n=emitted)
            emitted += 1
        time.sleep(0.001)
    drained_at = time.perf_counter()
    client = redis.client()
    delivered = wait_for(lambda: client.llen(QUEUE) >= emitted and client.llen(QUEUE), 60, "every event in Redis")
    drain_s = time.perf_counter() - drained_at
    stop.set()
    sampler.join()
    emitter.stop()
    redis.stop()

    def rss_at(t: float) -> float:
        return min(samples, key=lambda s: abs(s[0] - t))[1]

    before = rss_at(phases["up"])
    # Flat means the growth stops: the second half of the outage against the first.
    mid, late = rss_at(phases["up"] + DOWN_S / 2), rss_at(phases["down"])
    outage = [s for s in samples if phases["up"] <= s[0] <= phases["down"] + 0.5]
    peak = max(s[1] for s in outage)
    return {
        "variant": variant,
        "emitted": emitted,
        "in_broker": int(delivered),
        "all_delivered": int(delivered) == emitted,
        "drain_after_load_s": round(drain_s, 3),
        "rss_before_outage_mb": round(before, 1),
        "rss_peak_outage_mb": round(peak, 1),
        "rss_end_mb": round(samples[-1][1], 1),
        "growth_mb": round(peak - before, 1),
        "growth_first_half_mb": round(mid - before, 1),
        "growth_second_half_mb": round(late - mid, 2),
        "flat": late - mid < FLAT_MB,
        "max_waiting_events": max(s[2] for s in samples),
        "growth_bytes_per_waiting_event": round((peak - before) * 2**20 / max(1, *(s[2] for s in samples))),
    }


def run_memory(variants: tuple[str, ...] = ("memory", "spool")) -> dict[str, Any]:
    results: dict[str, Any] = {"rate_per_s": RATE, "up_s": UP_S, "down_s": DOWN_S, "after_s": AFTER_S}
    for variant in variants:
        out = subprocess.run(
            [sys.executable, "-m", "bench.memory", variant],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=180,
            check=True,
        )
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    return results


if __name__ == "__main__":
    print(json.dumps(_child(sys.argv[1])))
