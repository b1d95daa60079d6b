"""``celery -A bench.async_worker worker``: the async-listener benchmark's worker (bench.async_apps)."""

from __future__ import annotations

from litestar_celery_events import create_worker_app

app = create_worker_app("bench.async_apps:create_app")
