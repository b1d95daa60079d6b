"""The benchmark's events worker: ``celery -A bench.events_worker worker`` on ``bench.apps``."""

from __future__ import annotations

from bench import worker_profiling
from litestar_celery_events import create_worker_app

app = create_worker_app("bench.apps:create_events_app")
worker_profiling.install()
