"""How the publisher reaches a broker: one protocol (``base``), one module per broker."""

from __future__ import annotations

from typing import TYPE_CHECKING

from litestar_celery_events.brokers import is_redis_url
from litestar_celery_events.transports.base import Transport
from litestar_celery_events.transports.kombu import KombuTransport
from litestar_celery_events.transports.redis import RedisTransport

if TYPE_CHECKING:
    from celery import Celery

__all__ = ("KombuTransport", "RedisTransport", "Transport", "transport_for")


def transport_for(celery_app: Celery) -> Transport:
    """The fastest transport that keeps Celery's message format for ``celery_app``'s broker."""
    if is_redis_url(celery_app.conf.broker_write_url):
        return RedisTransport(celery_app)
    return KombuTransport(celery_app)
