"""Event ids: the names both sides route by, and the Celery task names they become."""

from __future__ import annotations

from litestar.exceptions import ImproperlyConfiguredException

__all__ = ("MAX_EVENT_ID_LENGTH", "event_task_name", "listener_task_name", "validate_event_id")

MAX_EVENT_ID_LENGTH = 200


def validate_event_id(event_id: object) -> str:
    """Event ids are stable contracts: non-empty strings without whitespace or control characters."""
    if not isinstance(event_id, str) or not event_id:
        raise ImproperlyConfiguredException(f"event id must be a non-empty string, got {event_id!r}")
    if len(event_id) > MAX_EVENT_ID_LENGTH:
        raise ImproperlyConfiguredException(f"event id is longer than {MAX_EVENT_ID_LENGTH} characters: {event_id!r}")
    if any(c.isspace() or not c.isprintable() for c in event_id):
        raise ImproperlyConfiguredException(f"event id must not contain whitespace or control characters: {event_id!r}")
    return event_id


def event_task_name(prefix: str, event_id: str) -> str:
    """The Celery task that runs every listener of ``event_id``: ``<prefix>.<event_id>``."""
    return f"{prefix}.{event_id}"


def listener_task_name(prefix: str, event_id: str, listener_name: str) -> str:
    """The Celery task of one listener of ``event_id`` (retries, routed listeners)."""
    return f"{prefix}.{event_id}[{listener_name}]"
