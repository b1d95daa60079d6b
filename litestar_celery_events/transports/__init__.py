"""Broker transports of the publisher, picked by the broker URL's scheme."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from litestar_celery_events.brokers import is_redis_url
from litestar_celery_events.transports.base import MessageRefused, Transport
from litestar_celery_events.transports.kombu import KombuTransport
from litestar_celery_events.transports.redis import RedisTransport

if TYPE_CHECKING:
    from collections.abc import Mapping

    from celery import Celery

__all__ = ("KombuTransport", "MessageRefused", "RedisTransport", "Transport", "transport_for")


def transport_for(celery_app: Celery, task_options: Mapping[str, Mapping[str, Any]] | None = None) -> Transport:
    """The fastest transport that keeps Celery's message format and routing for ``celery_app``'s broker.

    ``task_options``: task name -> its own Celery options (a listener's ``queue`` and ``priority``).
    """
    if is_redis_url(celery_app.conf.broker_write_url):
        return RedisTransport(celery_app, task_options)
    return KombuTransport(celery_app, task_options)
