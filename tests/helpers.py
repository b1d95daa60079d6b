"""Helpers for the tests: records of listener runs, real celery workers (processes and ports: ``harness``)."""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from harness import ROOT, LoggedProcess, free_port, http_get, http_up, port_open, redis_server_binary, wait_for

__all__ = (
    "ROOT",
    "CeleryProcess",
    "LoggedProcess",
    "celery_worker",
    "free_port",
    "http_get",
    "http_up",
    "port_open",
    "read_records",
    "redis_server_binary",
    "runs_of",
    "wait_for",
)


def read_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def runs_of(path: Path, listener: str) -> list[dict[str, Any]]:
    return [r for r in read_records(path) if r["listener"] == listener]


class CeleryProcess(LoggedProcess):
    """A real ``celery -A worker <command>`` subprocess."""

    def __init__(self, args: list[str], env: Mapping[str, str], log: Path) -> None:
        super().__init__([sys.executable, "-m", "celery", "-A", "worker", *args], env, log)

    def wait_ready(self, marker: str = "ready.", timeout: float = 60.0) -> None:
        self.wait_output(marker, timeout)


@contextmanager
def celery_worker(
    env: Mapping[str, str], log: Path, queues: str | None = None, extra: list[str] | None = None
) -> Iterator[CeleryProcess]:
    """``celery -A worker worker`` (prefork, 2 children) until the block ends."""
    # A unique node name: two sessions' workers on one RabbitMQ must not share a control queue.
    args = ["worker", "--loglevel", "INFO", "--concurrency", "2", "--without-gossip", "--without-mingle"]
    args += ["--hostname", f"test-{uuid.uuid4().hex[:8]}@%h"]
    if queues:
        args += ["--queues", queues]
    worker = CeleryProcess(args + (extra or []), env, log)
    try:
        worker.wait_ready()
        yield worker
    finally:
        worker.stop()
