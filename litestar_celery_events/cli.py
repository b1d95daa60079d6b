"""Litestar CLI commands: ``litestar --app APP events ...``. Imported only when the CLI asks."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import click
from litestar.cli._utils import LitestarGroup

from litestar_celery_events.config import redact_url
from litestar_celery_events.emitter import CeleryEventEmitter

if TYPE_CHECKING:
    from litestar import Litestar

__all__ = ("events_group", "status_of")


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
