"""Brokers: URL helpers (``urls``) and the one Redis client factory (``redis``), in one namespace."""

from litestar_celery_events.brokers.redis import BrokerRedis, RedisSettings, redis_settings, redis_settings_for_url
from litestar_celery_events.brokers.urls import (
    AMQP_TRANSPORTS,
    EMBEDDED_BROKER_URL,
    MAX_AMQP_DELAY_S,
    REDIS_TRANSPORTS,
    SOCKET_TIMEOUT_S,
    BrokerSettingError,
    embedded_broker_url,
    is_amqp_url,
    is_embedded_url,
    is_redis_url,
    redact_url,
    retry_delay_s,
    worth_logging,
)

__all__ = (
    "AMQP_TRANSPORTS",
    "EMBEDDED_BROKER_URL",
    "MAX_AMQP_DELAY_S",
    "REDIS_TRANSPORTS",
    "SOCKET_TIMEOUT_S",
    "BrokerRedis",
    "BrokerSettingError",
    "RedisSettings",
    "embedded_broker_url",
    "is_amqp_url",
    "is_embedded_url",
    "is_redis_url",
    "redact_url",
    "redis_settings",
    "redis_settings_for_url",
    "retry_delay_s",
    "worth_logging",
)
