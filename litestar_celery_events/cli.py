"""Litestar CLI commands: ``litestar --app APP events ...``. Imported only when the CLI asks."""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING, Any

import click
from litestar.cli._utils import LitestarGroup

from litestar_celery_events.config import redact_url
from litestar_celery_events.emitter import CeleryEventEmitter
from litestar_celery_events.runtime.worker_app import LITESTAR_APP_ENV

if TYPE_CHECKING:
    from collections.abc import Sequence

    from litestar import Litestar
    from litestar.cli._utils import LitestarEnv

__all__ = ("celery_invocation", "events_group", "status_of")

WORKER_MODULE = "worker"
"""What ``celery -A`` loads: the ``worker`` module shipped with this package (or the project's own)."""
FLOWER_AUTH_OPTIONS = ("--basic-auth", "--basic_auth", "--auth")
PASS_THROUGH = {"ignore_unknown_options": True, "allow_extra_args": True}


def emitter_of(app: Litestar) -> CeleryEventEmitter:
    emitter = app.event_emitter
    if not isinstance(emitter, CeleryEventEmitter):
        raise click.ClickException("this Litestar app has no CeleryEventsPlugin")
    return emitter


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
    _exec_celery(env, "flower", flower_args)
