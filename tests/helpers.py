"""Test helpers: waiting without sleeping blindly, and real `celery -A worker` processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def wait_for(
    predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition", interval: float = 0.05
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def read_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def runs_of(path: Path, listener: str) -> list[dict[str, Any]]:
    return [r for r in read_records(path) if r["listener"] == listener]


class CeleryProcess:
    """A real ``celery -A worker <command>`` subprocess with its output in a log file."""

    def __init__(self, args: list[str], env: Mapping[str, str], log: Path) -> None:
        self.log = log
        self._out = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker", *args],
            cwd=ROOT,
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, marker: str = "ready.", timeout: float = 60.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"celery exited with {self.proc.returncode}:\n{self.output()}")
            return marker in self.output()

        wait_for(ready, timeout=timeout, what=f"celery to print {marker!r}")

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._out.close()


@contextmanager
def celery_worker(
    env: Mapping[str, str], log: Path, queues: str | None = None, extra: list[str] | None = None
) -> Iterator[CeleryProcess]:
    """``celery -A worker worker`` (prefork, 2 children) until the block ends."""
    args = ["worker", "--loglevel", "INFO", "--concurrency", "2", "--without-gossip", "--without-mingle"]
    if queues:
        args += ["--queues", queues]
    worker = CeleryProcess(args + (extra or []), env, log)
    try:
        worker.wait_ready()
        yield worker
    finally:
        worker.stop()
