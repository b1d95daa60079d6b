"""Broker transports of the publisher, picked by the broker URL's scheme."""

from __future__ import annotations

from typing import TYPE_CHECKING

from litestar_celery_events.transports.base import Transport

if TYPE_CHECKING:
    from celery import Celery

__all__ = ("Transport", "transport_for")


def transport_for(celery_app: Celery) -> Transport:
    """The fastest transport that keeps Celery's message format for ``celery_app``'s broker."""
    from litestar_celery_events.transports.redis import REDIS_SCHEMES, RedisTransport

    if str(celery_app.conf.broker_url).startswith(REDIS_SCHEMES):
        return RedisTransport(celery_app)

    from litestar_celery_events.transports.kombu import KombuTransport

    return KombuTransport(celery_app)
