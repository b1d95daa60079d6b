"""``python -m bench`` (``make bench``): every benchmark, side by side, into bench/results/.

Writes ``bench/results/results.json`` (every figure, every repetition) and ``results.md`` (the
table), and prints the table. ``--quick`` runs fewer and shorter repetitions; ``--only`` picks
benchmarks by name. Everything runs on loopback against private servers and stops by itself.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from bench.common import ROOT, RedisServer, machine, versions
from bench.report import render

__all__ = ("main",)

RESULTS = ROOT / "bench" / "results"
STEPS = (
    "emit_cost",
    "publish",
    "publish_amqp",
    "async_calls",
    "request_path",
    "stall",
    "e2e",
    "async_listeners",
    "memory",
    "scheduling",
    "amqp_delayed",
    "outbox",
    "scaling",
)


def _own_process(module: str, timeout_s: float) -> dict[str, Any]:
    """A benchmark that sets env for its workers (``bench.<module>.run``), in a process of its own."""
    code = f"import json, sys; from bench.{module} import run; r = {{}}; run(r); print(json.dumps(r))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"bench.{module} exited with {out.returncode}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer, shorter repetitions (a smoke run)")
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(STEPS)}")
    parser.add_argument("--reps", type=int, default=None, help="repetitions of each side-by-side comparison")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the other benchmarks' figures of the existing results.json (each run noted in the table)",
    )
    args = parser.parse_args(argv)
    steps = [s for s in args.only.split(",") if s] or list(STEPS)
    reps = args.reps or (2 if args.quick else 5)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "command": "make bench  (python -m bench" + (" " + " ".join(argv) if argv else "") + ")",
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "reps": reps,
        "errors": {},
    }
    from bench import async_listeners, e2e, inprocess, memory, outbox, request_path

    with RedisServer() as redis:
        results["versions"] = versions(redis)
        runs: dict[str, Callable[[], Any]] = {
            "emit_cost": lambda: inprocess.emit_cost(redis, reps, calls=10_000 if args.quick else 20_000),
            "publish": lambda: inprocess.publish_throughput(redis, max(2, reps - 2)),
            "publish_amqp": lambda: inprocess.publish_throughput_amqp(max(2, reps - 2)),
            "async_calls": lambda: inprocess.async_calls(reps),
            "e2e": lambda: e2e.run_e2e(redis, max(2, reps - 2), n=2_000 if args.quick else 4_000),
            "async_listeners": lambda: async_listeners.run_async_listeners(
                redis, args.reps or min(reps, 3), args.quick
            ),
            "memory": memory.run_memory,
            "scheduling": lambda: _own_process("scheduling", 420),
            "amqp_delayed": lambda: _own_process("amqp_delayed", 600)["amqp_delayed"],
            # Its own Redis and PostgreSQL database (the docs' handler on advanced-alchemy).
            "outbox": lambda: outbox.run_outbox(n=2_000 if not args.quick else 500),
            # Its own Redis, RabbitMQ queue and 1/2/4 workers (env set for them: its own process).
            "scaling": lambda: _own_process("scaling", 600)["scaling"],
        }
        web = [s for s in ("request_path", "stall") if s in steps]
        for step in steps:
            if step in web:
                if step != web[0]:
                    continue
                with request_path.servers(redis.url) as ports:
                    for name in web:
                        _run(results, name, lambda name=name: _web(name, redis, ports, reps, args.quick))
                continue
            _run(results, step, runs[step])
    results["machine_end"] = machine()
    results["elapsed_s"] = round(time.perf_counter() - started, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.merge and (RESULTS / "results.json").exists():
        results = _merged(json.loads((RESULTS / "results.json").read_text()), results, steps)
    (RESULTS / "results.json").write_text(json.dumps(results, indent=1, sort_keys=False, default=str) + "\n")
    table = render(results)
    (RESULTS / "results.md").write_text(table)
    print(table)
    return 1 if results["errors"] else 0


def _merged(previous: dict[str, Any], run: dict[str, Any], steps: list[str]) -> dict[str, Any]:
    """``previous`` with ``steps`` replaced by this run's figures; the run's own header is kept
    under ``merged_runs`` so the table says which figures come from which run."""
    merged = dict(previous)
    for step in steps:
        merged.pop(step, None)
        merged.get("errors", {}).pop(step, None)
        if step in run:
            merged[step] = run[step]
        if step in run["errors"]:
            merged.setdefault("errors", {})[step] = run["errors"][step]
    header = {k: run[k] for k in ("command", "started_at", "machine", "machine_end", "elapsed_s", "reps") if k in run}
    # An earlier merged run keeps only the steps no later run replaced (none left: it goes).
    earlier = [{**run, "steps": [s for s in run["steps"] if s not in steps]} for run in previous.get("merged_runs", [])]
    merged["merged_runs"] = [*(run for run in earlier if run["steps"]), {"steps": steps, **header}]
    return merged


def _web(name: str, redis: RedisServer, ports: Any, reps: int, quick: bool) -> Any:
    from bench import request_path

    if name == "request_path":
        return request_path.run_request_path(redis, ports, reps, duration=2.0 if quick else 2.5)
    return request_path.run_stall(redis, ports, reps=1 if quick else 2)


def _run(results: dict[str, Any], name: str, fn: Callable[[], Any]) -> None:
    print(f"[bench] {name} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        results[name] = fn()
    except Exception:  # noqa: BLE001 - one broken benchmark must not lose the others' figures
        results["errors"][name] = traceback.format_exc(limit=8)
        print(results["errors"][name], file=sys.stderr)
    print(f"[bench] {name} done in {time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
