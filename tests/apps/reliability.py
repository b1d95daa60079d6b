"""The Litestar app of the reliability tests: listeners that fail, hang, crash or echo their input.

Like ``tests.apps.recording``, listeners append one JSON line per run to env RECORD_FILE. The
spool is on when env SPOOL=1.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from litestar import Litestar

from litestar_celery_events import CeleryEventsConfig, CeleryEventsPlugin, RetryPolicy, listener

NON_ASCII_EVENT = "commande_passée_✓"
LONG_EVENT = "e" * 200


def record(name: str, *args: Any, **kwargs: Any) -> None:
    path = os.environ.get("RECORD_FILE", "/tmp/records.jsonl")
    with open(path, "a", encoding="utf-8") as out:
        out.write(json.dumps({"listener": name, "pid": os.getpid(), "args": args, "kwargs": kwargs}) + "\n")


def _flag(name: str) -> Path:
    return Path(os.environ.get("RECORD_FILE", "/tmp/records.jsonl")).with_suffix(f".{name}")


def _describe(value: Any) -> Any:
    """What arrived, with its type: JSON cannot show a datetime from a str."""
    if isinstance(value, dict):
        return {k: _describe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_describe(v) for v in value]
    return [type(value).__name__, repr(value)]


@listener("echo", NON_ASCII_EVENT, LONG_EVENT)
def echo(*args: Any, **kwargs: Any) -> None:
    record("echo", *[_describe(a) for a in args], **{k: _describe(v) for k, v in kwargs.items()})


@listener("doomed", max_retries=1, default_retry_delay=0.1, retry_backoff=False)
def doomed(n: int) -> None:
    """Fails until the test creates its flag file (then a replay succeeds)."""
    record("doomed:attempt", n=n)
    if not _flag("doomed-fixed").exists():
        raise RuntimeError(f"payment provider rejected order {n}")
    record("doomed", n=n)


@listener("doomed")
def doomed_sibling(n: int) -> None:
    record("doomed_sibling", n=n)


@listener("slow_job")
def slow_listener(seconds: float) -> None:
    record("slow_listener:start")
    time.sleep(seconds)
    record("slow_listener:done")


@listener("hang", time_limit=1, max_retries=0)
def hangs(seconds: float) -> None:
    record("hangs:start")
    time.sleep(seconds)
    record("hangs:done")


@listener("returns")
def returns_value(n: int) -> dict[str, int]:
    record("returns_value", n=n)
    return {"n": n}


@listener("strict")
def strict_listener(a: int) -> None:
    record("strict_listener", a=a)


def create_app() -> Litestar:
    return Litestar(
        listeners=[echo, doomed, doomed_sibling, slow_listener, hangs, returns_value, strict_listener],
        plugins=[
            CeleryEventsPlugin(
                CeleryEventsConfig(
                    default_queue=os.environ.get("TEST_QUEUE"),
                    default_retry=RetryPolicy(max_retries=1, default_retry_delay=0.1, retry_backoff=False),
                    flush_timeout_s=5,
                    spool=os.environ.get("SPOOL") == "1",
                )
            )
        ],
    )
