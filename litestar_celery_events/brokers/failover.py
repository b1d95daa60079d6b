"""A Redis that cannot take writes for now is a connection problem, not a refused command.

During a Sentinel failover (and whenever a master runs with ``min-replicas-to-write`` and has
lost its replicas) Redis answers writes with ``NOREPLICAS``, ``MASTERDOWN`` or ``READONLY``.
redis-py raises those as ``ResponseError``, which kombu counts as a channel error (the worker
stops: "Unrecoverable error") and the publisher as a message the broker refuses. The connection
classes here raise ``MasterUnavailableError``, a ``redis.ConnectionError``, instead, after
dropping the connection: every client then reconnects, asking the Sentinels for the master
again, and retries as after any lost connection. Used by the client factory (``brokers.redis``)
and by the worker's Redis transport (``runtime.redis_fetch``).
"""

from __future__ import annotations

from typing import Any

import redis
from redis.sentinel import SentinelManagedConnection, SentinelManagedSSLConnection

__all__ = (
    "UNWRITABLE_REPLIES",
    "FailoverAwareConnection",
    "FailoverAwareSSLConnection",
    "FailoverAwareSentinelConnection",
    "FailoverAwareSentinelSSLConnection",
    "FailoverAwareUnixConnection",
    "MasterUnavailableError",
    "failover_aware",
    "failover_hazard",
    "unwritable",
)

UNWRITABLE_REPLIES = ("NOREPLICAS", "MASTERDOWN", "READONLY")
"""Error replies of a server that cannot take writes now (redis-py strips ``READONLY``: see ``unwritable``)."""


class MasterUnavailableError(redis.ConnectionError):
    """The server answered that it cannot take writes now: reconnect (through the Sentinels) and retry."""


def unwritable(exc: BaseException) -> bool:
    """True for a reply meaning "no writes here for now" (a failover under way, or replicas lost)."""
    if isinstance(exc, redis.ReadOnlyError):  # redis-py has stripped the READONLY code from its text
        return True
    if not isinstance(exc, redis.ResponseError):
        return False
    text = str(exc)
    if " of pipeline caused error: " in text:  # redis-py's wrapping of a pipeline's reply
        text = text.split(" of pipeline caused error: ", 1)[1]
    return text.split(" ", 1)[0] in UNWRITABLE_REPLIES


class _FailoverAware:
    """Mixin for a redis-py connection class: an unwritable reply drops the connection and raises
    ``MasterUnavailableError`` (a ``ConnectionError``)."""

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)  # type: ignore[misc]
        except redis.ResponseError as exc:
            if not unwritable(exc):
                raise
            self.disconnect()  # type: ignore[attr-defined]
            raise MasterUnavailableError(f"{exc} (the server takes no writes now: a failover?)") from exc


class FailoverAwareConnection(_FailoverAware, redis.Connection):
    pass


class FailoverAwareSSLConnection(_FailoverAware, redis.SSLConnection):
    pass


class FailoverAwareUnixConnection(_FailoverAware, redis.UnixDomainSocketConnection):
    pass


class FailoverAwareSentinelConnection(_FailoverAware, SentinelManagedConnection):
    pass


class FailoverAwareSentinelSSLConnection(_FailoverAware, SentinelManagedSSLConnection):
    pass


_AWARE: dict[type[Any], type[Any]] = {
    redis.Connection: FailoverAwareConnection,
    redis.SSLConnection: FailoverAwareSSLConnection,
    redis.UnixDomainSocketConnection: FailoverAwareUnixConnection,
    SentinelManagedConnection: FailoverAwareSentinelConnection,
    SentinelManagedSSLConnection: FailoverAwareSentinelSSLConnection,
}


def failover_aware(connection_class: type[Any] | None) -> type[Any] | None:
    """The failover-aware version of one of redis-py's connection classes (others are returned as they are)."""
    if connection_class is None:
        return None
    aware: type[Any] = _AWARE.get(connection_class, connection_class)
    return aware


def failover_hazard(client: redis.Redis) -> str | None:
    """Why a Sentinel failover of this master could lose or double writes, or None.

    Without ``min-replicas-to-write``, the old master takes writes for the seconds between the
    promotion of its replica and its own conversion, and Sentinel then discards them. ``CONFIG``
    may be refused (managed Redis): then nothing can be told.
    """
    try:
        value = client.config_get("min-replicas-to-write").get("min-replicas-to-write")
    except redis.ResponseError:
        return None
    if value is None or int(value) >= 1:
        return None
    return (
        "the broker's Redis master runs with min-replicas-to-write 0: during a Sentinel failover it keeps "
        "taking writes that Sentinel then discards (delayed events lost or run twice); set min-replicas-to-write 1 "
        "on every Redis server, with two replicas (README, Guarantees)"
    )
