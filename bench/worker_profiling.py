"""Optional pyinstrument profiles of a benchmark worker (env ``BENCH_PROFILE_DIR``).

The consumer process profiles itself from start to shutdown, each prefork child for its first
``CHILD_TASKS`` tasks; each writes ``<role>-<pid>.txt`` there. ``python -m bench.profile worker``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from celery import signals

__all__ = ("install",)

_profilers: dict[int, Any] = {}


def _start(**_: object) -> None:
    from pyinstrument import Profiler

    for pid in [pid for pid in _profilers if pid != os.getpid()]:  # a forked child inherits the consumer's
        _profilers.pop(pid).stop()
    profiler = Profiler(interval=0.0005)
    profiler.start()
    _profilers[os.getpid()] = profiler


def _stop(role: str) -> Any:
    def stop(**_: object) -> None:
        profiler = _profilers.pop(os.getpid(), None)
        if profiler is None:
            return
        profiler.stop()
        out = Path(os.environ["BENCH_PROFILE_DIR"]) / f"{role}-{os.getpid()}.txt"
        flat = profiler.output_text(unicode=False, color=False, flat=True)
        tree = profiler.output_text(unicode=False, color=False, show_all=False)
        out.write_text(f"### self time by function\n{flat}\n### call tree (library frames folded)\n{tree}")

    return stop


CHILD_TASKS = 1500
"""A prefork child writes its profile after this many tasks (children may not see a clean shutdown)."""
_done = [0]


def _count(**_: object) -> None:
    _done[0] += 1
    if _done[0] == CHILD_TASKS:
        _stop("child")()


def install() -> None:
    if not os.environ.get("BENCH_PROFILE_DIR"):
        return
    signals.worker_process_init.connect(_start, weak=False)
    signals.task_postrun.connect(_count, weak=False)
    signals.worker_init.connect(_start, weak=False)
    signals.worker_shutdown.connect(_stop("consumer"), weak=False)
