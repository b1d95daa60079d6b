"""Helpers for the tests: records of listener runs, real celery workers (processes and ports: ``harness``)."""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import pytest
from kombu import Connection

from harness import ROOT, LoggedProcess, free_port, http_get, http_up, port_open, redis_server_binary, wait_for

__all__ = (
    "ADVANCED_ALCHEMY_MISSING",
    "HAS_NAMED_DEPENDENCY",
    "ROOT",
    "NamedDependency",
    "amqp_queue_exists",
    "delete_delay_levels",
    "needs_advanced_alchemy",
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


if TYPE_CHECKING:
    from litestar_celery_events.transports.amqp_delay import DelayLevels

T = TypeVar("T")

try:
    from litestar.di import NamedDependency

    HAS_NAMED_DEPENDENCY = True
except ImportError:  # Litestar before 2.23 (2.12 is the lowest supported): a parameter a layer provides needs no mark
    NamedDependency = Annotated[T, "unmarked"]  # type: ignore[misc]
    HAS_NAMED_DEPENDENCY = False

# advanced-alchemy's Litestar plugin (the outbox, the demo's database) does not import on Litestar
# before 2.23: the tests that need it are not collected or are skipped there (the lowest-versions run).
try:
    import advanced_alchemy.extensions.litestar  # noqa: F401
except ImportError as error:
    ADVANCED_ALCHEMY_MISSING: str | None = str(error)
else:
    ADVANCED_ALCHEMY_MISSING = None
needs_advanced_alchemy = pytest.mark.skipif(
    ADVANCED_ALCHEMY_MISSING is not None, reason=f"advanced-alchemy's Litestar plugin: {ADVANCED_ALCHEMY_MISSING}"
)


def amqp_queue_exists(amqp_url: str, queue: str) -> bool:
    with Connection(amqp_url) as connection:
        try:
            connection.channel().queue_declare(queue=queue, passive=True)
        except Exception:  # noqa: BLE001 - 404 NOT_FOUND (it closes the channel)
            return False
        return True


def delete_delay_levels(amqp_url: str, levels: DelayLevels, if_empty: bool = False) -> None:
    """Delete the delay levels' queues and exchanges (with ``if_empty``: only if no level holds a message)."""
    with Connection(amqp_url) as connection:
        channel = connection.channel()
        names = levels.names()
        if if_empty and any(channel.queue_declare(queue=name, passive=True).message_count for name in names[:-1]):
            return
        for name in names:
            if name != levels.delivery_exchange:
                channel.queue_delete(name)
            channel.exchange_delete(name)


def read_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    text = path.read_text()
    complete = text[: text.rfind("\n") + 1]  # a line another process is still writing is read next time
    return [json.loads(line) for line in complete.splitlines() if line.strip()]


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
