"""Beat's crontab ticks against stock Celery: the same tick on every supported Celery version.

``next_crontab_tick`` reads the crontab's fields itself because ``crontab.remaining_delta`` answers
differently across Celery versions. Where every supported version agrees (the last run read in the
schedule's timezone, and "now" on the same day), Celery's own answer is the reference.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from celery import Celery
from celery.beat import ScheduleEntry
from celery.schedules import crontab

from litestar_celery_events.runtime.beat import next_crontab_tick, tick_slot

SPECS: dict[str, dict[str, Any]] = {
    "every-5-minutes": {"minute": "*/5"},
    "hourly-at-30": {"minute": 30},
    "daily-at-07": {"minute": 0, "hour": 7},
    "weekdays-at-09-15": {"minute": 15, "hour": 9, "day_of_week": "mon-fri"},
    "sundays-twice": {"minute": "0,30", "hour": "3,22", "day_of_week": "sun"},
    "first-of-the-month": {"minute": 0, "hour": 0, "day_of_month": 1},
    "quarterly-on-the-15th": {"minute": 45, "hour": 12, "day_of_month": 15, "month_of_year": "*/3"},
    "every-31st": {"minute": 0, "hour": 6, "day_of_month": 31},
}
TIMEZONES = ["UTC", "Europe/Paris", "Asia/Tokyo", "America/New_York"]


def celery_app(tz: str) -> Celery:
    app = Celery(set_as_current=False)
    app.conf.timezone = tz
    return app


def celery_tick(app: Celery, spec: dict[str, Any], last: datetime) -> datetime:
    """Stock Celery's next run after ``last``, asked the way every supported Celery answers alike."""
    local = last.astimezone(app.timezone)
    reference = crontab(**spec, app=app, nowfun=lambda: local)
    start, delta, _ = reference.remaining_delta(local)
    return start + delta  # type: ignore[no-any-return]


def last_runs(seed: str) -> list[datetime]:
    """Instants spread over 2030, some on a minute boundary as beat's own last runs often are."""
    rng = random.Random(seed)
    start = datetime(2030, 1, 1, tzinfo=timezone.utc)
    instants = [start + timedelta(seconds=rng.randrange(365 * 86400)) for _ in range(150)]
    return instants + [instant.replace(second=0) for instant in instants[:50]]


@pytest.mark.parametrize("tz", TIMEZONES)
@pytest.mark.parametrize("name", SPECS)
def test_the_next_crontab_tick_is_stock_celerys(name: str, tz: str) -> None:
    app = celery_app(tz)
    spec = SPECS[name]
    sched = crontab(**spec, app=app)
    compared = 0
    for last in last_runs(f"{name}/{tz}"):
        ours = next_crontab_tick(sched, last)
        assert ours.timestamp() == celery_tick(app, spec, last).timestamp(), (name, tz, last)
        assert ours > last
        compared += 1
    assert compared == 200


def test_a_crontab_tick_is_read_in_the_schedules_timezone_whatever_the_last_runs() -> None:
    app = celery_app("Europe/Paris")
    daily = crontab(minute=30, hour=9, app=app)
    last = datetime(2030, 3, 10, 21, 42, tzinfo=timezone.utc)  # 22:42 in Paris
    assert next_crontab_tick(daily, last) == datetime(2030, 3, 11, 8, 30, tzinfo=timezone.utc)
    assert next_crontab_tick(daily, last.astimezone(app.timezone)) == next_crontab_tick(daily, last)


def test_a_last_run_days_ago_gives_the_first_tick_after_it_not_a_later_one() -> None:
    app = celery_app("Europe/Paris")
    entry = ScheduleEntry(
        name="x", task="t", schedule=crontab(minute="*/5", app=app), last_run_at=datetime(2020, 1, 1, 20, 42), app=app
    )
    assert tick_slot(entry) == datetime(2020, 1, 1, 20, 45, tzinfo=timezone.utc).timestamp()  # naive means UTC


def test_a_crontab_on_a_date_that_never_comes_is_refused_by_name() -> None:
    never = crontab(minute=0, hour=0, month_of_year=2, app=celery_app("UTC"))
    never.day_of_month = {30}  # Celery 5.4 accepts day_of_month=30 with month_of_year=2; later versions refuse it
    with pytest.raises(ValueError, match="matches no date"):
        next_crontab_tick(never, datetime(2030, 1, 1, tzinfo=timezone.utc))
