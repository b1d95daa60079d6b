"""The bundled demo: Litestar's event docs examples, running on Celery (``python -m demo``)."""
