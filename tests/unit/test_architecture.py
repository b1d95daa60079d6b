"""The web process never loads worker code; the layers hold (import-linter runs in `make lint`)."""

from __future__ import annotations

import json
import subprocess
import sys


def _modules_after(code: str) -> list[str]:
    ours = "sorted(m for m in sys.modules if m.startswith('litestar_celery_events'))"
    probe = f"{code}; import sys, json; print(json.dumps({ours}))"
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout
    return list(json.loads(out.splitlines()[-1]))


def test_importing_the_package_and_the_emitter_loads_no_worker_runtime() -> None:
    loaded = _modules_after("import litestar_celery_events, litestar_celery_events.emitter")
    assert [m for m in loaded if ".runtime" in m] == []
    assert "litestar_celery_events.contract.message" in loaded


def test_create_worker_app_still_imports_from_the_package_root() -> None:
    loaded = _modules_after("from litestar_celery_events import create_worker_app")
    assert "litestar_celery_events.runtime.app" in loaded
