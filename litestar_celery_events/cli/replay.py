"""``litestar events failed replay``: the message that re-runs one failed listener."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from litestar_celery_events.contract.message import Emission, new_emission_id

if TYPE_CHECKING:
    from litestar_celery_events.config import CeleryEventsConfig
    from litestar_celery_events.listeners import ListenerRegistry

__all__ = ("ReplayError", "replay_emission")


class ReplayError(LookupError):
    """A record that cannot be replayed: its event or listener is not in this app, or it has no arguments."""


def replay_emission(record: dict[str, Any], registry: ListenerRegistry, config: CeleryEventsConfig) -> Emission:
    """The message that re-runs ``record``'s listener only: its own task, fresh retries, same arguments.

    The task id is new (``<emission>:<listener>:replay-<n>``); ``root_id`` stays the original
    emission id, so a replay that fails again overwrites this same record.
    """
    event_id, listener = str(record["event_id"]), str(record["listener"])
    specs = registry.by_event.get(event_id)
    if not specs:
        raise ReplayError(f"event {event_id!r} has no listener in this app: nothing to replay it to")
    spec = next((s for s in specs if s.name == listener), None)
    if spec is None:
        raise ReplayError(
            f"{listener!r} is not a listener of event {event_id!r} in this app "
            f"(listeners: {', '.join(s.name for s in specs)})"
        )
    emission = Emission.create(
        event_id,
        config.listener_task_name(event_id, spec.name),
        tuple(record.get("args") or ()),
        dict(record.get("kwargs") or {}),
        max_payload_bytes=config.max_payload_bytes,
        queue=spec.task_options.get("queue"),  # else the Celery app's routes decide, as for the worker's retries
    )
    original = str(record["emission_id"])
    emission.emission_id = f"{original}:{spec.name}:replay-{new_emission_id()[-8:]}"
    emission.emitted_at = float(record.get("emitted_at") or emission.emitted_at)
    emission.extra_headers = {"root_id": original}
    return emission
