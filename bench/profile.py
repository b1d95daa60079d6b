"""Profiles of the hot paths with pyinstrument: ``python -m bench.profile [emit|publish|worker]``.

- ``emit``: 50,000 ``emit`` calls (the caller's thread, publisher running, real Redis);
- ``publish``: the publisher thread's work for 50,000 events (envelopes + pipelined writes);
- ``worker``: a prefork ``-c 2`` events worker draining 4,000 events of one no-op listener,
  profiled in the consumer process and in each child.

Writes ``bench/results/profile-<what>.txt`` (pyinstrument's text tree).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, CeleryWorker, RedisServer, wait_for

__all__ = ("main",)

OUT = ROOT / "bench" / "results"
N = 50_000


def _profiler() -> object:
    from pyinstrument import Profiler

    return Profiler(interval=0.0002)


def _write(name: str, text: str) -> Path:
    path = OUT / f"profile-{name}.txt"
    path.write_text(text)
    return path


def profile_emit(redis: RedisServer) -> str:
    from bench.inprocess import PUBLISH_QUEUE, _events_emitter

    emitter = _events_emitter(redis.url, PUBLISH_QUEUE, max_buffered_events=N + 1)
    emitter.start()
    profiler = _profiler()
    emit = emitter.emit
    start = time.perf_counter()
    profiler.start()  # type: ignore[attr-defined]
    for i in range(N):
        emit("user_created", email="user@example.com", n=i)
    profiler.stop()  # type: ignore[attr-defined]
    elapsed = time.perf_counter() - start
    emitter.stop()
    head = f"# {N} emit calls: {elapsed / N * 1e6:.2f} us per call under the profiler\n"
    return head + profiler.output_text(unicode=False, color=False)  # type: ignore[attr-defined]


def profile_publish(redis: RedisServer) -> str:
    from bench.inprocess import PUBLISH_QUEUE, _events_emitter
    from litestar_celery_events.contract.message import Emission
    from litestar_celery_events.transports import transport_for

    emitter = _events_emitter(redis.url, PUBLISH_QUEUE)
    transport = transport_for(emitter.celery_app)
    batch_size = emitter.config.publish_batch_size
    emissions = [
        Emission.create(
            "user_created",
            "events.user_created",
            (),
            {"email": "user@example.com", "n": i},
            max_payload_bytes=10**6,
            queue=PUBLISH_QUEUE,
        )
        for i in range(N)
    ]
    profiler = _profiler()
    start = time.perf_counter()
    profiler.start()  # type: ignore[attr-defined]
    for i in range(0, N, batch_size):
        transport.publish(emissions[i : i + batch_size], [0])
    profiler.stop()  # type: ignore[attr-defined]
    elapsed = time.perf_counter() - start
    transport.close()
    redis.client().delete(PUBLISH_QUEUE)
    head = f"# {N} events published in batches of {batch_size}: {elapsed / N * 1e6:.2f} us per event\n"
    return head + profiler.output_text(unicode=False, color=False)  # type: ignore[attr-defined]


def profile_worker(redis: RedisServer, events: int = 4_000) -> str:
    from bench.e2e import EVENTS_QUEUE, fill, wait_consuming, worker_args

    folder = Path(tempfile.mkdtemp(prefix="bench-profile-"))
    env = {"BENCH_REDIS_URL": redis.url, "BENCH_PROFILE_DIR": str(folder), "BENCH_EVENTS_QUEUE": EVENTS_QUEUE}
    worker = CeleryWorker("bench.events_worker", worker_args(EVENTS_QUEUE), env, folder / "worker.log")
    client = redis.client()
    try:
        wait_consuming(redis, worker, "events.bench_sync", EVENTS_QUEUE)
        start = time.perf_counter()
        fill(redis, "events.bench_sync", EVENTS_QUEUE, events)
        wait_for(lambda: client.llen(EVENTS_QUEUE) == 0, timeout=120, what="the worker to drain the queue")
        elapsed = time.perf_counter() - start
    finally:
        worker.stop()
    time.sleep(0.5)
    parts = [f"# {events} events through one worker (prefork -c 2): {events / elapsed:.0f} events/s under the profiler"]
    for path in sorted(folder.glob("*.txt")):
        parts.append(f"\n## {path.stem}\n{path.read_text()}")
    return "\n".join(parts)


def main(argv: list[str]) -> None:
    what = argv or ["emit", "publish", "worker"]
    with RedisServer() as redis:
        for name in what:
            text = {"emit": profile_emit, "publish": profile_publish, "worker": profile_worker}[name](redis)
            print(text.splitlines()[0], "->", _write(name, text).relative_to(ROOT))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main(sys.argv[1:])
