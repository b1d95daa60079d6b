"""``make demo`` (``python -m demo``): the README's first command, end to end, on the embedded broker."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_the_demo_shows_each_listener_the_outbox_and_the_scheduler() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("CELERY_BROKER_URL", "LITESTAR_APP", "DEMO_DATABASE_URL")}
    out = subprocess.run(
        [sys.executable, "-m", "demo"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout
    assert "broker = the embedded filesystem broker" in lines
    assert "(web app!)" not in lines  # every listener ran in the worker
    for name in (
        "send_welcome_email_handler",
        "send_email_handler",
        "send_farewell_email_handler",
        "notify_customer_support",
        "check_user_row",
        "report_stats",
        "send_trial_reminder",
    ):
        assert f"  {name} " in lines, name
    assert "users/invite" in lines and "-> 400" in lines
    assert "carol's reminder ran 1 time(s)" in lines
    assert "dave's reminder: cancel_scheduled -> True, ran 0 time(s)" in lines
    assert "the listener found her row: True" in lines
    assert "mallory's rolled-back request: listener runs 0" in lines
    assert "litestar events status: outbox depth 0" in lines
    assert lines.rstrip().endswith("demo: done")
