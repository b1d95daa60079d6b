"""The README's Flower screenshot, taken by headless Chromium (Debian's) against a real Flower.

Runs ``scripts/flower_screenshot.py`` as ``make screenshot`` does, into a temporary file.
``scripts/screenshot/ensure-browser.sh`` installs chromium and playwright-core where missing.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.integration

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def browser() -> None:
    ensure = subprocess.run(
        ["bash", str(ROOT / "scripts" / "screenshot" / "ensure-browser.sh")],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if ensure.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"cannot install chromium/playwright-core:\n{ensure.stderr}")
        pytest.skip(f"no chromium/playwright-core here: {ensure.stderr.strip()}")


@pytest.mark.timeout(900)  # a fresh machine installs chromium first
def test_headless_chromium_photographs_the_demos_events_in_flower(browser: None, tmp_path: Path) -> None:
    out = tmp_path / "flower-tasks.png"
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "flower_screenshot.py"), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr

    # What the picture shows: each demo event by name, with its arguments, succeeded.
    table = run.stdout
    for name in ("events.user_created", "events.password_changed", "events.user_deleted"):
        assert name in table
    assert "{'email': 'grace@example.com'}" in table
    assert "SUCCESS" in table

    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1440, 600)
    assert len(data) > 20_000, "a blank page compresses to a few kilobytes"
