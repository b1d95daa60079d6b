"""Periodic events: what ``celery -A worker beat`` emits, and when."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from celery.schedules import crontab
from celery.schedules import schedule as celery_schedule

from litestar_celery_events.contract.events import validate_event_id

__all__ = ("PeriodicEvent",)


@dataclass(frozen=True)
class PeriodicEvent:
    """An event ``celery -A worker beat`` emits on a schedule, as an ordinary event.

    ``schedule`` is a Celery ``crontab`` (evaluated in ``CeleryEventsConfig.timezone``), a
    ``timedelta`` or a number of seconds; intervals tick on multiples of their length since the
    Unix epoch, so every beat process agrees on the ticks.
    """

    event_id: str
    schedule: crontab | timedelta | float
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] | None = None
    name: str | None = None
    """Identity of the schedule (its ticks are deduplicated by name); default ``<event_id>@<schedule>``."""
    interval_s: float | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        validate_event_id(self.event_id)
        interval: float | None = None
        if isinstance(self.schedule, crontab):
            label = " ".join(str(self.schedule).split()[1:6])
        else:
            if isinstance(self.schedule, celery_schedule):
                interval = self.schedule.run_every.total_seconds()
            elif isinstance(self.schedule, timedelta):
                interval = self.schedule.total_seconds()
            elif isinstance(self.schedule, (int, float)) and not isinstance(self.schedule, bool):
                interval = float(self.schedule)
            else:
                raise TypeError(
                    f"PeriodicEvent {self.event_id!r}: schedule must be a celery crontab, a timedelta or seconds, "
                    f"got {type(self.schedule).__name__}"
                )
            if not math.isfinite(interval) or interval <= 0:
                raise ValueError(f"PeriodicEvent {self.event_id!r}: the interval must be positive, got {interval}")
            label = f"every {interval:g}s"
        object.__setattr__(self, "interval_s", interval)
        object.__setattr__(self, "args", tuple(self.args))
        object.__setattr__(self, "kwargs", dict(self.kwargs or {}))
        if self.name is None:
            object.__setattr__(self, "name", f"{self.event_id}@{label}")

    @property
    def key(self) -> str:
        return str(self.name)
