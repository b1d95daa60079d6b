"""The record of a listener run that failed for good, as the failed-events store keeps it."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ("ListenerFailure",)


@dataclass
class ListenerFailure:
    """A listener run that failed for good: retries exhausted, or an error no retry can fix."""

    event_id: str
    emission_id: str
    listener: str
    args: list[Any]
    kwargs: dict[str, Any]
    exc_type: str
    message: str
    traceback: str
    attempts: int
    permanent: bool
    """True when retrying could not help (signature mismatch, unknown listener)."""
    emitted_at: float | None = None
    failed_at: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
