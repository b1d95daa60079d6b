"""Runs only inside ``celery -A worker worker|beat`` (and ``inline_events``): the worker's Celery app,
the event and listener tasks, listener calls, the event loop, failures, refused messages, the
delayed-event mover and beat's scheduler. The web side never imports this package."""
