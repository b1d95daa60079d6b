# One image for every role of docker-compose.yml: web (uvicorn), worker, beat and flower.
# The role is the service's command; the configuration is the environment (CELERY_BROKER_URL,
# LITESTAR_APP, CELERY_EVENTS_DATA_DIR, FLOWER_BASIC_AUTH), the same for every role.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app

WORKDIR /app

# Dependencies first, so editing the code does not reinstall them.
COPY pyproject.toml README.md LICENSE ./
COPY litestar_celery_events ./litestar_celery_events
COPY worker ./worker
RUN pip install '.[flower,outbox]' 'uvicorn>=0.30'

# The demo app (LITESTAR_APP=demo.app:app); replace with your own application's code.
COPY demo ./demo

RUN useradd --create-home --uid 1000 app && mkdir -p /data && chown app /data
USER app

EXPOSE 8000 5555
CMD ["uvicorn", "demo.app:app", "--host", "0.0.0.0", "--port", "8000"]
