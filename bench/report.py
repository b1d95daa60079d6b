"""Renders ``results.json`` as the markdown table in ``bench/results/results.md``.

``python -m bench.report`` re-renders the markdown from the JSON without re-running anything;
``python -m bench.report --readme`` puts the targets table into README.md's Performance section.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

__all__ = ("render",)


def _num(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float) and abs(value) >= 100:
        return f"{value:,.0f}"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _s(summary: dict[str, Any] | None, digits: int = 2, unit: str = "") -> str:
    """``median (min-max)`` of a summary."""
    if not summary or summary.get("median") is None:
        return "n/a"
    med, lo, hi = (_num(summary[k], digits) for k in ("median", "min", "max"))
    return f"{med}{unit} ({lo}-{hi})" if summary.get("n", 1) > 1 else f"{med}{unit}"


def _get(results: dict[str, Any], *path: str) -> Any:
    node: Any = results
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _met(value: Any, target: float, higher_is_better: bool = True) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    ok = value >= target if higher_is_better else value <= target
    return "yes" if ok else "**no**"


def _targets(r: dict[str, Any]) -> list[str]:  # noqa: PLR0915 - one row per target, in order
    rows = ["| benchmark | measured: median (min-max) | target | met |", "| --- | --- | --- | --- |"]

    def row(name: str, figure: str, target: str, met: str) -> None:
        rows.append(f"| {name} | {figure} | {target} | {met} |")

    rp = r.get("request_path")
    if rp:
        ratio = rp["ratio"]
        row(
            "Request path: req/s emitting ÷ not emitting",
            _s(ratio.get("events")) + "x",
            "≥ 0.95x",
            _met(_get(ratio, "events", "median"), 0.95),
        )
        row(
            "… same, by the server's CPU time per request",
            _s(rp["cpu_ratio"].get("events")) + "x",
            "(noise-robust)",
            "",
        )
        row("… Litestar `SimpleEventEmitter` (baseline)", _s(ratio.get("simple")) + "x", "(anchor 0.94x)", "")
        row("… `apply_async` in the handler (baseline)", _s(ratio.get("naive")) + "x", "(anchor 0.19x)", "")
        row(
            "… `apply_async` on a thread pool (baseline)",
            _s(ratio.get("naive_pool")) + "x",
            "(anchor ~1.0x, backlog)",
            "",
        )
        emit = rp["emit_p50_us"]
        row(
            "`emit()` p50 inside the handler under load",
            _s(emit.get("events"), unit=" µs"),
            "≤ 5 µs",
            _met(_get(emit, "events", "median"), 5.0, higher_is_better=False),
        )
        broker = rp["broker"].get("events", [])
        if broker:
            emitted = sum(b["emitted"] for b in broker)
            in_broker = sum(b["in_broker"] for b in broker)
            worst = max(b["after_s"] for b in broker)
            row(
                "… emitted events in the broker after the load",
                f"{in_broker:,} of {emitted:,} (within {worst:.2f} s)",
                "all, within seconds",
                _met(in_broker, emitted),
            )
    ec = r.get("emit_cost")
    if ec:
        p50 = ec["p50_us"]
        row(
            "`emit()` p50 in-process (publisher running)",
            _s(p50.get("events"), unit=" µs"),
            "≤ 5 µs",
            _met(_get(p50, "events", "median"), 5.0, higher_is_better=False),
        )
        row(
            "… `SimpleEventEmitter.emit` / `apply_async` p50",
            f"{_s(p50.get('simple'), unit=' µs')} / {_s(p50.get('apply_async'), unit=' µs')}",
            "(baselines)",
            "",
        )
    st = _get(r, "stall", "summary")
    if st:
        row(
            f"Broker stall 3 s (worst of {st.get('reps', 1)} runs): probe requests over 100 ms",
            _num(st["probe_over_100ms"]) + f" (max {_num(st['probe_max_ms'], 1)} ms)",
            "0",
            _met(st["probe_over_100ms"], 0, higher_is_better=False),
        )
        row(
            "… emitting route p99 paused ÷ unpaused",
            f"{_num(st['emit_p99_ratio'])}x ({_num(st['emit_p99_paused_ms'], 1)}"
            f" vs {_num(st['emit_p99_unpaused_ms'], 1)} ms)",
            "≤ 2x",
            _met(st["emit_p99_ratio"], 2.0, higher_is_better=False),
        )
        row(
            "… every event delivered afterwards",
            f"{_num(st['in_broker'])} of {_num(st['emitted'])}",
            "all",
            _met(st["in_broker"], st["emitted"]),
        )
        row(
            "… `apply_async` in the handler, same stall",
            f"probe over 100 ms: {_num(st['naive_probe_over_100ms'])}, max {_num(st['naive_probe_max_ms'], 0)} ms",
            "(baseline)",
            "",
        )
    pub = r.get("publish")
    if pub:
        row(
            "Publish throughput, one process, ÷ `apply_async` loop",
            f"{_s(pub['ratio'], 1)}x ({_s(pub['events_per_s'], 0)} vs {_s(pub['apply_async_per_s'], 0)} /s)",
            "≥ 10x",
            _met(_get(pub, "ratio", "median"), 10.0),
        )
    amqp = r.get("publish_amqp")
    if amqp:
        row(
            "… on RabbitMQ, until confirmed, ÷ `apply_async` on RabbitMQ",
            f"{_s(amqp['ratio'], 1)}x ({_s(amqp['events_per_s'], 0)} vs {_s(amqp['apply_async_per_s'], 0)} /s)",
            "(reported)",
            "",
        )
    e2e = r.get("e2e")
    if e2e:
        rates = e2e["events_per_s"]
        row(
            "End to end, one worker (prefork -c 2), no-op listener ÷ plain Celery no-op task",
            f"{_s(e2e['ratio_sync'])}x ({_s(rates['events_sync'], 0)} vs {_s(rates['plain_sync'], 0)} /s)",
            "≥ 0.9x",
            _met(_get(e2e, "ratio_sync", "median"), 0.9),
        )
        row(
            "… same ÷ a plain no-op task with `acks_late` (the guarantees event tasks have)",
            f"{_s(e2e.get('ratio_sync_vs_acks_late'))}x ({_s(rates.get('plain_acks_late'), 0)} /s)",
            "(baseline)",
            "",
        )
        row(
            "… async listener, persistent loop ÷ `asyncio.run()` per task (as a listener)",
            f"{_s(e2e['ratio_async'])}x ({_s(rates['events_async'], 0)} vs "
            f"{_s(rates.get('events_asyncio_run'), 0)} /s)",
            "≥ 1.2x",
            _met(_get(e2e, "ratio_async", "median"), 1.2),
        )
        row(
            "… same ÷ a plain Celery task running `asyncio.run()`",
            f"{_s(e2e.get('ratio_async_vs_plain'))}x ({_s(rates['plain_asyncio_run'], 0)} /s)",
            "(baseline)",
            "",
        )
        lat50, lat99 = e2e["latency_p50_ms"], e2e["latency_p99_ms"]
        row(
            "Latency emit → listener start at 200 events/s, p50",
            _s(lat50.get("events"), unit=" ms"),
            "≤ 5 ms",
            _met(_get(lat50, "events", "median"), 5.0, higher_is_better=False),
        )
        row(
            "… p99",
            _s(lat99.get("events"), unit=" ms"),
            "≤ 15 ms",
            _met(_get(lat99, "events", "median"), 15.0, higher_is_better=False),
        )
        row(
            "… plain `apply_async` → task start p50 / p99",
            f"{_s(lat50.get('plain'), unit=' ms')} / {_s(lat99.get('plain'), unit=' ms')}",
            "(baseline)",
            "",
        )
    rows += _async_listener_rows(r.get("async_listeners"))
    ac = r.get("async_calls")
    if ac:
        row(
            "Async no-op call: persistent loop ÷ `asyncio.run()` (in-process)",
            f"{_s(ac['speedup'], 1)}x "
            f"({_s(ac['persistent_loop_us'], 1, ' µs')} vs {_s(ac['asyncio_run_us'], 1, ' µs')})",
            "(detail)",
            "",
        )
    mem = r.get("memory")
    if mem:
        for variant, label in (("memory", "in-memory buffer"), ("spool", "disk spool")):
            m = mem.get(variant)
            if m:
                half = _num(mem.get("down_s", 10) / 2, 0)
                spooled = variant == "spool"
                row(
                    f"Web RSS, broker down {_num(mem.get('down_s', 10), 0)} s at 1,000 events/s ({label})",
                    f"+{_num(m['growth_mb'], 1)} MB ({_num(m['rss_before_outage_mb'], 1)} → "
                    f"{_num(m['rss_peak_outage_mb'], 1)}; first {half} s +{_num(m.get('growth_first_half_mb'), 1)}, "
                    f"last {half} s +{_num(m.get('growth_second_half_mb'), 2)}) "
                    f"for {_num(m['max_waiting_events'])} waiting; "
                    f"delivered {_num(m['in_broker'])}/{_num(m['emitted'])}",
                    "flat: last half < +1 MB" if spooled else "bounded (max_buffered_events)",
                    _met(m.get("growth_second_half_mb"), 1.0, higher_is_better=False) if spooled else "",
                )
    sched = r.get("scheduling", {}).get("scheduling") if isinstance(r.get("scheduling"), dict) else None
    if sched:
        row(
            "Worker RSS with 100,000 scheduled events (delta)",
            f"{_num(sched.get('worker_rss_delta_mib'), 1)} MiB",
            "unchanged",
            "",
        )
        due = sched.get("due_to_start_ms") or {}
        row("… due → start latency p50 / p99", f"{_num(due.get('median'), 1)} / {_num(due.get('p99'), 1)} ms", "", "")
    _amqp_delayed_rows(r.get("amqp_delayed"), row)
    _outbox_rows(r.get("outbox"), row)
    _scaling_rows(r.get("scaling"), row)
    return rows


def _scaling_rows(s: dict[str, Any] | None, row: Any) -> None:
    """Scale-out: drain rates by worker count, publish ceiling, store bytes (docs/scaling.md)."""
    if not s or "redis" not in s:
        return
    for side in ("redis", "rabbitmq"):
        drains = s.get(side, {}).get("drain_events_per_s", {})
        figure = " / ".join(_s(drains.get(str(c)), 0) for c in s["worker_counts"])
        row(f"Scale-out {side}: events/s with 1 / 2 / 4 workers", figure, "(capacity model)", "")
        row(f"… {side} publish only, events/s", _s(s.get(side, {}).get("publish_events_per_s"), 0), "", "")
    mem = s.get("memory", {})
    bytes_ = f"{_num(mem.get('delayed_bytes_per_event'), 0)} / {_num(mem.get('failed_bytes_per_record'), 0)} B"
    row("Redis bytes per delayed event / failed record", bytes_, "", "")


def _amqp_delayed_rows(a: dict[str, Any] | None, row: Any) -> None:
    """RabbitMQ: the delay levels and Celery's ETA, side by side in one run."""
    if not a or "delay_levels" not in a:
        return
    levels, eta = a["delay_levels"], a.get("celery_eta", {})
    late = levels["due_soon_lateness"]
    backlog = f"{_num(levels['backlog_an_hour_ahead'])} due in an hour"
    row(
        f"RabbitMQ: {late['expected']} events due in 3 s behind {backlog}: start - due p95 (delay levels)",
        f"{_num(late.get('p95_s'), 2)} s (min {_num(late.get('min_s'), 2)}, max {_num(late.get('max_s'), 2)}; "
        f"{late['started']}/{late['expected']} started, {late['early']} early)",
        "≤ 3 s, never early",
        _met(late.get("p95_s"), 3.0, higher_is_better=False)
        if late["started"] == late["expected"] and not late["early"]
        else "**no**",
    )
    if eta:
        waited = eta["waited_s"]
        row(
            f"… Celery's ETA (baseline, same run): started within {_num(waited, 0)} s of due / within 3 s",
            f"{_num(eta.get(f'due_soon_started_within_{waited:g}s'))} / "
            f"{_num(eta['due_soon_lateness'].get('started_within_3s'))} of {eta['due_soon']} "
            f"(worker held {_num(eta.get('held_by_worker_after_wait'))} of the backlog)",
            "(measured before: 0 of 100)",
            "",
        )
    row(
        f"RabbitMQ: worker RSS growth with {_num(levels['scheduled_an_hour_ahead'])} scheduled an hour ahead",
        f"{_num(levels['worker_rss_growth_mib'], 1)} MiB ({_num(levels['worker_rss_idle_mib'], 1)} → "
        f"{_num(levels['worker_rss_with_scheduled_mib'], 1)}; {_num(levels['waiting_in_delay_levels'])} in the "
        f"delay levels, {_num(levels['waiting_in_event_queue'])} in the event queue)",
        "< 50 MB",
        _met(levels["worker_rss_growth_mib"] * 1.048576, 50.0, higher_is_better=False),
    )
    if eta:
        row(
            f"… Celery's ETA worker after {_num(eta['waited_s'], 0)} s of the {_num(eta['backlog_an_hour_ahead'])} "
            "backlog (baseline)",
            f"+{_num(eta['worker_rss_growth_mib'], 1)} MiB, holding {_num(eta.get('held_by_worker_after_wait'))} "
            "ETA tasks (the rest still queued: it takes them one QoS bump at a time)",
            "",
            "",
        )


def _outbox_rows(ob: dict[str, Any] | None, row: Any) -> None:
    """The docs' handler on advanced-alchemy with autocommit: plain emit against the outbox, one run."""
    if not ob or "outbox" not in ob or "plain_emit" not in ob:
        return
    plain, outbox = ob["plain_emit"], ob["outbox"]
    missing = outbox["runs_missing_their_row"]
    row(
        f"Listener runs missing their row ({_num(outbox['requests'])} requests), outbox / plain emit",
        f"{_num(missing)} / {_num(plain['runs_missing_their_row'])}",
        "0 with the outbox",
        _met(missing, 0, higher_is_better=False),
    )
    ghosts = outbox["events_delivered_for_rolled_back"]
    row(
        f"Events delivered for rolled-back requests ({_num(outbox['rolled_back_requests'])}), outbox / plain",
        f"{_num(ghosts)} / {_num(plain['events_delivered_for_rolled_back'])}",
        "0",
        _met(ghosts, 0, higher_is_better=False),
    )
    lat, base = outbox["commit_to_listener_ms"], plain["commit_to_listener_ms"]
    row(
        "Commit → listener start p50 / p99, outbox (plain emit)",
        f"{_num(lat['p50'], 1)} / {_num(lat['p99'], 1)} ms ({_num(base['p50'], 1)} / {_num(base['p99'], 1)} ms)",
        "p50 within 2 ms",
        _met(ob.get("p50_added_ms"), 2.0, higher_is_better=False),
    )
    probe = ob.get("publish_after_commit_ms") or {}
    if probe:
        row(
            "… the web side's share: event at the broker - commit, p50 / p99, outbox (plain emit)",
            f"{_num(probe['outbox']['p50'], 2)} / {_num(probe['outbox']['p99'], 2)} ms "
            f"({_num(probe['plain_emit']['p50'], 2)} / {_num(probe['plain_emit']['p99'], 2)} ms)",
            "",
            "",
        )
    row(
        "Docs' handler req/s with the outbox ÷ without",
        f"{_num(ob.get('throughput_ratio'))}x "
        f"({_num(outbox['requests_per_s'], 0)} / {_num(plain['requests_per_s'], 0)} req/s; pairs "
        f"{', '.join(_num(r) for r in (ob.get('throughput') or {}).get('ratios', []))})",
        "≥ 0.9x",
        _met(ob.get("throughput_ratio"), 0.9),
    )
    cpu = ob.get("cpu_throughput_ratio") or {}
    row(
        "… same, by the web process's CPU time per request (sequential / concurrent)",
        f"{_num(cpu.get('sequential'))}x / {_num(cpu.get('concurrent'))}x",
        "(noise-robust)",
        "",
    )
    relay = ob.get("relay") or {}
    row(
        f"Outbox relay, one process, PostgreSQL ({_num(relay.get('rows'))} rows)",
        f"{_num(relay.get('rows_per_s'), 0)} rows/s ({_num(relay.get('rows_per_cpu_s'), 0)} per CPU-second)",
        "≥ 10,000/s",
        _met(relay.get("rows_per_s"), 10_000),
    )


def _async_listener_rows(al: dict[str, Any] | None) -> list[str]:
    """The asyncio pool (``async_concurrency``) against prefork -c 2, arq and saq."""
    if not al:
        return []
    rates = al["events_per_s"]
    conc = al.get("concurrency", 100)

    def vs(key: str, case: str, other: str) -> str:
        return f"{_s(al[key])}x ({_s(rates[case]['async'], 0)} vs {_s(rates[case][other], 0)} /s)"

    def met(key: str, target: float) -> str:
        return _met(_get(al, key, "median"), target)

    p99 = al["latency_p99_ms"]
    return [
        f"| Async listener (`await asyncio.sleep(0.05)`), one worker: `async_concurrency={conc}` ÷ prefork -c 2 "
        f"| {vs('ratio_sleep_vs_prefork', 'sleep_50ms', 'prefork')} | ≥ 20x | {met('ratio_sleep_vs_prefork', 20)} |",
        f"| … same ÷ arq ({conc} jobs at once, same run) | {vs('ratio_sleep_vs_arq', 'sleep_50ms', 'arq')} "
        f"| ≥ 1.0x | {met('ratio_sleep_vs_arq', 1.0)} |",
        f"| … same ÷ saq ({conc} jobs at once, same run) | {vs('ratio_sleep_vs_saq', 'sleep_50ms', 'saq')} "
        "| (anchor) |  |",
        f"| … async no-op listener ÷ prefork -c 2 (today) | {vs('ratio_noop_vs_prefork', 'noop', 'prefork')} "
        f"| ≥ 1.0x | {met('ratio_noop_vs_prefork', 1.0)} |",
        f"| … CPU-bound sync listener ÷ prefork -c 2 | {vs('ratio_cpu_vs_prefork', 'cpu_sync', 'prefork')} "
        f"| ≥ 1.0x | {met('ratio_cpu_vs_prefork', 1.0)} |",
        f"| … mixed app (50 ms async + 50 ms blocking sync listener) ÷ prefork -c 2 "
        f"| {vs('ratio_mixed_vs_prefork', 'mixed', 'prefork')} | (default choice) |  |",
        f"| … emit → listener start p99 at {_num(al['latency_rate_per_s'], 0)} events/s, 50 ms listener "
        f"| {_s(p99, unit=' ms')} (p50 {_s(al['latency_p50_ms'], unit=' ms')}) | ≤ 15 ms "
        f"| {_met(_get(p99, 'median'), 15.0, higher_is_better=False)} |",
    ]


def _details(r: dict[str, Any]) -> list[str]:
    out: list[str] = []
    rp = r.get("request_path")
    if rp:
        out += [
            "",
            f"### Request path ({rp['connections']} connections, {rp['duration_s']} s per run, "
            f"{rp['reps']} repetitions, order rotated)",
            "",
            "| variant | req/s | p50 ms | p99 ms | server CPU µs/request | emit() p50 µs |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for name in rp["rps"]:
            out.append(
                f"| {name} | {_s(rp['rps'][name], 0)} | {_s(rp['latency_p50_ms'][name], 1)} | "
                f"{_s(rp['latency_p99_ms'][name], 1)} | {_s(rp['server_cpu_us_per_request'][name], 0)} | "
                f"{_s(rp['emit_p50_us'].get(name), 1)} |"
            )
        pool = rp["broker"].get("naive_pool", [])
        if pool:
            out += [
                "",
                "Thread-pool variant: events still in the pool when the run ended (cancelled, never "
                "published): " + ", ".join(_num(b["pool_backlog"]) for b in pool) + ".",
            ]
    e2e = r.get("e2e")
    if e2e:
        out += [
            "",
            f"### End to end ({e2e['measured']:,} of {e2e['messages']:,} pre-filled messages timed per run)",
            "",
            "| variant | events/s |",
            "| --- | --- |",
        ]
        out += [f"| {name} | {_s(v, 0)} |" for name, v in e2e["events_per_s"].items()]
    al = r.get("async_listeners")
    if al:
        systems = ["prefork", "async", "arq", "saq"]
        out += [
            "",
            f"### Async listeners (events/s, one worker each; `async` = `async_concurrency={al.get('concurrency')}`)",
            "",
            "| listener | " + " | ".join(systems) + " |",
            "| --- | " + " | ".join("---" for _ in systems) + " |",
        ]
        for case, by in al["events_per_s"].items():
            out.append(f"| {case} | " + " | ".join(_s(by.get(name), 0) for name in systems) + " |")
    return out


def _merged_runs(results: dict[str, Any]) -> list[str]:
    lines = []
    for run in results.get("merged_runs", []):
        m, end = run.get("machine", {}), run.get("machine_end", {})
        lines.append(
            f"Figures of {', '.join(run['steps'])}: from `{run.get('command')}`, started {run.get('started_at')}, "
            f"took {run.get('elapsed_s')} s; load average {m.get('load_avg')} → {end.get('load_avg')}."
        )
    return [*lines, ""] if lines else []


def render(results: dict[str, Any]) -> str:
    m = results.get("machine", {})
    end = results.get("machine_end", {})
    v = results.get("versions", {})
    lines = [
        "# Benchmark results",
        "",
        f"Command: `{results.get('command', 'make bench')}`; started {results.get('started_at')}, "
        f"took {results.get('elapsed_s')} s; {results.get('reps')} repetitions per comparison.",
        "",
        f"Machine: {m.get('cpu')}, {m.get('cores')} cores, {m.get('memory_gib')} GiB, {m.get('os')}, "
        f"Python {m.get('python')}; load average {m.get('load_avg')} at the start, {end.get('load_avg')} at the end "
        "(other work shares these cores: compare the ratios, not the absolute figures).",
        "",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        "",
        "Every comparison runs side by side in the same run; ratios are per repetition, then the median "
        "(min-max). Targets are the project's goals, measured, not timed tests.",
        "",
        *_merged_runs(results),
        *_targets(results),
        *_details(results),
    ]
    errors = results.get("errors") or {}
    if errors:
        lines += ["", "### Errors", ""] + [
            f"- {name}: `{err.strip().splitlines()[-1]}`" for name, err in errors.items()
        ]
    return "\n".join(lines) + "\n"


README_START = "<!-- bench:start (python -m bench.report --readme) -->"
README_END = "<!-- bench:end -->"


def update_readme(results: dict[str, Any], readme: Path) -> None:
    """Put the targets table of ``results`` between the README's bench markers (figures stay in sync)."""
    text = readme.read_text(encoding="utf-8")
    start, end = text.index(README_START) + len(README_START), text.index(README_END)
    m, v = results.get("machine", {}), results.get("versions", {})
    head = (
        f"Run {results.get('started_at')} ({results.get('elapsed_s')} s), {m.get('cores')} cores ({m.get('cpu')}), "
        f"load average {m.get('load_avg')} → {results.get('machine_end', {}).get('load_avg')}; "
        f"litestar {v.get('litestar')}, celery {v.get('celery')}, kombu {v.get('kombu')}, redis-py {v.get('redis')}, "
        f"redis-server {v.get('redis-server')}; commit {v.get('commit')}."
    )
    block = "\n".join(["", head, "", *_merged_runs(results), *_targets(results), ""])
    readme.write_text(text[:start] + block + text[end:], encoding="utf-8")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    root = Path(__file__).resolve().parent.parent
    path = Path(args[0]) if args else root / "bench" / "results" / "results.json"
    with open(path, encoding="utf-8") as f:
        loaded = json.load(f)
    if "--readme" in sys.argv:
        update_readme(loaded, root / "README.md")
    else:
        print(render(loaded))
