"""Litestar CLI commands: ``litestar --app APP events ...``. Imported only when the CLI asks."""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING, Any

import click
from litestar.cli._utils import LitestarGroup

from litestar_celery_events.brokers import redact_url
from litestar_celery_events.cli.replay import ReplayError, replay_emission
from litestar_celery_events.config import LITESTAR_APP_ENV
from litestar_celery_events.emitter import CeleryEventEmitter
from litestar_celery_events.emitter import emitter_of as _emitter_of
from litestar_celery_events.errors import PluginNotInstalledError
from litestar_celery_events.scheduling import scheduling_status
from litestar_celery_events.stores.spool import spool_depth
from litestar_celery_events.stores.state import failed_store_for
from litestar_celery_events.transports import transport_for

if TYPE_CHECKING:
    from collections.abc import Sequence

    from litestar import Litestar
    from litestar.cli._utils import LitestarEnv


__all__ = ("celery_invocation", "events_group", "status_of")

WORKER_MODULE = "worker"
"""What ``celery -A`` loads: the ``worker`` module shipped with this package (or the project's own)."""
FLOWER_AUTH_OPTIONS = ("--basic-auth", "--basic_auth", "--auth")
FLOWER_TASKS_COLUMNS = "name,uuid,state,args,kwargs,retries,exception,received,runtime,worker"
"""Flower's task list with each event's arguments, retries and error (Flower's default omits them)."""
PASS_THROUGH = {"ignore_unknown_options": True, "allow_extra_args": True}


def emitter_of(app: Litestar) -> CeleryEventEmitter:
    """The app's emitter; a CLI error (not a traceback) when the app has no CeleryEventsPlugin."""
    try:
        return _emitter_of(app)
    except PluginNotInstalledError as exc:
        raise click.ClickException(str(exc)) from None


def status_of(app: Litestar) -> dict[str, Any]:
    """What ``events status`` prints: broker (password redacted), events, listeners and their tasks."""
    emitter = emitter_of(app)
    config = emitter.config
    return {
        "broker": redact_url(config.resolved_broker_url),
        "task_name_prefix": config.task_name_prefix,
        "events": {
            event_id: [
                {
                    "listener": spec.name,
                    "task": config.listener_task_name(event_id, spec.name),
                    "runs_as_own_task": spec.runs_as_own_task,
                    "options": {k: repr(v) for k, v in sorted(spec.task_options.items())},
                }
                for spec in specs
            ]
            for event_id, specs in sorted(emitter.registry.by_event.items())
        },
        "spooled_events": spool_depth(config),
        "failed_events": _failed_summary(emitter),
        "scheduling": scheduling_status(emitter, STATUS_TIMEOUT_S),
        "outbox": _outbox_summary(emitter),
    }


@click.group(cls=LitestarGroup, name="events")
def events_group() -> None:
    """Litestar events on Celery: workers, schedules, failed events."""


@events_group.command(name="status")  # type: ignore[untyped-decorator]  # LitestarGroup.command
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status_command(app: Litestar, as_json: bool) -> None:
    """Show the broker, the registered events and their listeners."""
    status = status_of(app)
    if as_json:
        click.echo(json.dumps(status, indent=2))
        return
    click.echo(f"broker: {status['broker']}")
    click.echo(f"spooled events (waiting for the broker): {status['spooled_events']}")
    failed = status["failed_events"]
    click.echo(f"failed events: {failed.get('count', failed.get('error'))} in {failed['store']}")
    scheduling = status["scheduling"]
    waiting = scheduling.get("delayed_events_waiting", scheduling.get("error", "not counted"))
    click.echo(f"delayed events waiting in {scheduling['delayed_events_wait_in']}: {waiting}")
    for periodic in scheduling["periodic"]:
        click.echo(f"periodic {periodic['name']}: last tick {periodic.get('last_tick') or 'never'}")
    outbox = status["outbox"]
    if outbox is not None and "error" in outbox:
        click.echo(f"outbox ({outbox['table']} in {outbox['database']}): {outbox['error']}")
    elif outbox is not None:
        age = "-" if outbox["oldest_row_age_s"] is None else f"{outbox['oldest_row_age_s']:.1f}s"
        click.echo(
            f"outbox ({outbox['table']} in {outbox['database']}): {outbox['depth']} row(s), oldest {age}, "
            f"relay lag {outbox['relay_lag_s']:.1f}s ({outbox['overdue']} past their lease)"
        )
    for event_id, listeners in status["events"].items():
        click.echo(f"{event_id}  (task {emitter_of(app).config.event_task_name(event_id)})")
        for entry in listeners:
            click.echo(f"  - {entry['listener']}")


def celery_invocation(env: LitestarEnv, command: str, celery_args: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """``python -m celery -A worker <command> <celery_args>`` and its environment, for the CLI's app."""
    emitter_of(env.app)  # fail here, not in Celery, when the app has no CeleryEventsPlugin
    environ = dict(os.environ)
    environ[LITESTAR_APP_ENV] = env.app_path
    app_dir = str(env.cwd)
    environ["PYTHONPATH"] = os.pathsep.join(p for p in (app_dir, environ.get("PYTHONPATH")) if p)
    return [sys.executable, "-m", "celery", "-A", WORKER_MODULE, command, *celery_args], environ


def _exec_celery(env: LitestarEnv, command: str, celery_args: Sequence[str]) -> None:
    argv, environ = celery_invocation(env, command, celery_args)
    click.echo(f"running: LITESTAR_APP={env.app_path} celery -A {WORKER_MODULE} {command} {' '.join(celery_args)}")
    sys.stdout.flush()
    os.chdir(env.cwd)
    os.execve(argv[0], argv, environ)  # Celery replaces the CLI: signals reach it directly


@events_group.command(name="worker", context_settings=PASS_THROUGH)  # type: ignore[untyped-decorator]
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker_command(env: LitestarEnv, celery_args: tuple[str, ...]) -> None:
    """Run the listeners: celery -A worker worker [CELERY_ARGS], for this app."""
    _exec_celery(env, "worker", celery_args)


@events_group.command(name="beat", context_settings=PASS_THROUGH)  # type: ignore[untyped-decorator]
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def beat_command(env: LitestarEnv, celery_args: tuple[str, ...]) -> None:
    """Send delayed and periodic events: celery -A worker beat [CELERY_ARGS], for this app."""
    _exec_celery(env, "beat", celery_args)


@events_group.command(name="flower", context_settings=PASS_THROUGH)  # type: ignore[untyped-decorator]
@click.option("--no-auth", is_flag=True, help="Run Flower without authentication (never by default).")
@click.argument("flower_args", nargs=-1, type=click.UNPROCESSED)
def flower_command(env: LitestarEnv, no_auth: bool, flower_args: tuple[str, ...]) -> None:
    """Watch events in Flower: celery -A worker flower [FLOWER_ARGS]; needs basic auth."""
    has_auth = bool(os.environ.get("FLOWER_BASIC_AUTH") or os.environ.get("FLOWER_AUTH")) or any(
        arg.startswith(FLOWER_AUTH_OPTIONS) for arg in flower_args
    )
    if not (has_auth or no_auth):
        raise click.ClickException(
            "Flower can revoke tasks and shut workers down: set FLOWER_BASIC_AUTH=user:password "
            "(or pass --basic-auth=user:password), or --no-auth to run it open on purpose"
        )
    if not os.environ.get("FLOWER_TASKS_COLUMNS") and not any(a.startswith("--tasks") for a in flower_args):
        flower_args = (f"--tasks_columns={FLOWER_TASKS_COLUMNS}", *flower_args)
    _exec_celery(env, "flower", flower_args)


STATUS_TIMEOUT_S = 2.0
"""``events status`` answers within about this long even when the broker hangs."""


def _failed_summary(emitter: CeleryEventEmitter) -> dict[str, Any]:
    store = failed_store_for(emitter.config, emitter.celery_app, timeout_s=STATUS_TIMEOUT_S)
    try:
        return {"store": store.location, "count": store.count()}
    except Exception as exc:  # noqa: BLE001 - status must print even when the store is unreachable
        return {"store": store.location, "error": f"unavailable ({redact_url(str(exc))})"}
    finally:
        store.close()


def _outbox_summary(emitter: CeleryEventEmitter) -> dict[str, Any] | None:
    """Outbox depth, age of its oldest row and relay lag (how long the most overdue row has waited)."""
    if emitter.outbox is None:
        return None
    outbox = emitter.outbox.outbox
    url = outbox.database_url()
    summary: dict[str, Any] = {"table": outbox.table.name, "database": url.render_as_string(hide_password=True)}
    store = outbox.open_store(timeout_s=STATUS_TIMEOUT_S)
    try:
        found = store.status()
    except Exception as exc:  # noqa: BLE001 - status must print even when the database is unreachable
        return {**summary, "error": f"unavailable ({redact_url(type(exc).__name__ + ': ' + str(exc))})"}
    finally:
        store.close()
    return {
        **summary,
        "depth": found.depth,
        "oldest_row_age_s": found.oldest_age_s,
        "relay_lag_s": found.relay_lag_s,
        "overdue": found.overdue,
    }


@events_group.group(name="failed")
def failed_group() -> None:
    """Failed events: listener runs that exhausted their retries or can never succeed."""


def _store_of(app: Litestar) -> Any:
    emitter = emitter_of(app)
    return failed_store_for(emitter.config, emitter.celery_app)


def _json_default(value: Any) -> Any:
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


@failed_group.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array, one object per record.")
@click.option("--event", "event_id", default=None, help="Only records of this event id.")
@click.option("--listener", default=None, help="Only records of this listener (full or short name).")
def failed_list_command(app: Litestar, as_json: bool, event_id: str | None, listener: str | None) -> None:
    """List failed events, oldest first."""
    records = _store_of(app).records(event_id=event_id, listener=listener)
    if as_json:
        click.echo(redact_url(json.dumps(records, default=_json_default, ensure_ascii=False)))
        return
    for record in records:
        click.echo(
            f"{record['id']}  {record['event_id']}  {record['listener']}  attempts={record['attempts']}  "
            f"{record['exc_type']}: {redact_url(str(record['message']))[:200]}"
        )
    click.echo(f"{len(records)} failed event(s)")


@failed_group.command(name="show")
@click.argument("record_id")
def failed_show_command(app: Litestar, record_id: str) -> None:
    """Show one failed event in full (arguments, exception, traceback) as JSON."""
    record = _store_of(app).get(record_id)
    if record is None:
        raise click.ClickException(f"no failed event {record_id!r}")
    click.echo(redact_url(json.dumps(record, default=_json_default, indent=2, ensure_ascii=False)))


@failed_group.command(name="replay")
@click.argument("record_ids", nargs=-1, required=True)
def failed_replay_command(app: Litestar, record_ids: tuple[str, ...]) -> None:
    """Re-enqueue a failed event for its listener only, with fresh retries; the record is removed."""
    emitter = emitter_of(app)
    store = failed_store_for(emitter.config, emitter.celery_app)
    transport = transport_for(emitter.celery_app)
    try:
        for record_id in record_ids:
            record = store.get(record_id)
            if record is None:
                raise click.ClickException(f"no failed event {record_id!r}")
            try:
                emission = replay_emission(record, emitter.registry, emitter.config)
            except ReplayError as exc:
                raise click.ClickException(f"cannot replay {record_id}: {exc}") from None
            transport.publish([emission], [0])
            store.delete([record_id])
            click.echo(f"replayed {record_id}: task {emission.task_name} id {emission.emission_id}")
    finally:
        transport.close()


@failed_group.command(name="purge")
@click.option("--event", "event_id", default=None, help="Only records of this event id.")
@click.option("--listener", default=None, help="Only records of this listener (full or short name).")
def failed_purge_command(app: Litestar, event_id: str | None, listener: str | None) -> None:
    """Delete failed events (all of them, or those of one event or listener)."""
    store = _store_of(app)
    if event_id is None and listener is None:
        removed = store.purge()
    else:
        removed = store.delete(r["id"] for r in store.records(event_id=event_id, listener=listener))
    click.echo(f"purged {removed} failed event(s)")
