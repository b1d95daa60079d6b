"""``celery -A worker worker|beat|flower``: the Litestar app named by env LITESTAR_APP, on Celery."""

from litestar_celery_events import create_worker_app

app = create_worker_app()
