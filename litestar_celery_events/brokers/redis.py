"""The one Redis client factory: every Redis connection the library opens is the one kombu would open.

The publisher, the failed-events store, the delayed-event store and its mover, beat and the CLI
all reach the broker's Redis through ``redis_settings(celery_app).open()``. The settings are read
where Celery reads them (``app.connection_for_write()``: ``broker_url`` with its ``;`` failover
list, ``broker_use_ssl``, the ``rediss://`` query spellings, ``broker_user`` and
``broker_password``, ``broker_transport_options``) and turned into redis-py arguments the way
kombu's Redis channel does (``Channel._connparams``, ``SentinelChannel``), once per Celery app at
start-up. A setting the library cannot honour raises ``BrokerSettingError`` naming it.
"""

from __future__ import annotations

import inspect
import os
import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis
from kombu import Connection
from kombu.utils import symbol_by_name
from kombu.utils.url import url_to_parts
from redis.sentinel import Sentinel, SentinelManagedConnection, SentinelManagedSSLConnection

from litestar_celery_events.brokers.failover import failover_aware
from litestar_celery_events.brokers.urls import REDIS_TRANSPORTS, SOCKET_TIMEOUT_S, BrokerSettingError, redact_url

if TYPE_CHECKING:
    from celery import Celery

__all__ = ("BrokerRedis", "RedisSettings", "redis_settings", "redis_settings_for_url")

_DEFAULT_PORTS = {"redis": 6379, "rediss": 6379, "sentinel": 26379}
# Transport options kombu's Redis channel hands to redis-py (``Channel.from_transport_options``).
_POOL_OPTIONS = (
    "max_connections",
    "socket_timeout",
    "socket_connect_timeout",
    "socket_keepalive",
    "socket_keepalive_options",
    "health_check_interval",
    "retry_on_timeout",
    "client_name",
)
_KOMBU_HEALTH_CHECK_INTERVAL_S = 25
_SSL_KEYS = frozenset(p for p in inspect.signature(redis.SSLConnection.__init__).parameters if p.startswith("ssl_"))


@dataclass(frozen=True)
class _Endpoint:
    """One way to reach the broker's Redis: a server, or the master a group of Sentinels names."""

    pool_kwargs: dict[str, Any] = field(repr=False)  # holds the password: never in a repr or a log
    sentinels: tuple[tuple[str, int], ...] = ()
    master_name: str = ""
    sentinel_options: dict[str, Any] = field(default_factory=dict, repr=False)

    def client(self, timeout_s: float | None) -> tuple[redis.Redis, Sentinel | None]:
        kwargs = dict(self.pool_kwargs)
        for name in ("socket_timeout", "socket_connect_timeout"):
            if timeout_s is not None:
                kwargs[name] = timeout_s
            elif kwargs.get(name) is None:
                kwargs[name] = SOCKET_TIMEOUT_S
        if kwargs.get("connection_class") is redis.UnixDomainSocketConnection:
            kwargs.pop("socket_connect_timeout", None)  # as kombu: a unix socket has no connect phase to bound
        # A server that takes no writes now (failing over) raises a ConnectionError: reconnect, retry.
        kwargs["connection_class"] = failover_aware(kwargs.get("connection_class", redis.Connection))
        if not self.sentinels:
            return redis.Redis(connection_pool=redis.ConnectionPool(**kwargs)), None
        # kombu's SentinelChannel: the sentinels get the same arguments as the master, except the
        # credentials, which ``master_for`` receives (Sentinel's own come from ``sentinel_kwargs``).
        master_kwargs = {k: kwargs.pop(k) for k in ("username", "password") if k in kwargs}
        sentinel = Sentinel(list(self.sentinels), **self.sentinel_options, **kwargs)
        return sentinel.master_for(self.master_name, redis_class=redis.Redis, **master_kwargs), sentinel


@dataclass(frozen=True)
class RedisSettings:
    """The broker's Redis as kombu would reach it: parsed and checked once, shared by every client."""

    endpoints: tuple[_Endpoint, ...]
    """One per URL of a ``;`` failover list (a Sentinel group is one endpoint)."""
    global_keyprefix: str = ""
    """kombu's ``global_keyprefix`` transport option: prepended to every key it writes."""
    location: str = ""
    """The broker URL with passwords redacted, for logs and ``events status``."""

    def open(self, timeout_s: float | None = None) -> BrokerRedis:
        """A client handle; ``timeout_s`` overrides the socket timeouts (``events status`` must answer fast)."""
        return BrokerRedis(self, timeout_s)


class BrokerRedis:
    """A redis-py client for the broker, made when first used, remade after a fork or a ``close()``.

    The fork rule: a client made in a parent is never used in a forked child (its sockets are the
    parent's); the child makes its own. A failover list (``redis://a;redis://b``) is tried in order,
    from the server that answered last, as kombu's round-robin failover does.
    """

    def __init__(self, settings: RedisSettings, timeout_s: float | None = None) -> None:
        self.settings = settings
        self._timeout_s = timeout_s
        self._client: redis.Redis | None = None
        self._sentinel: Sentinel | None = None
        self._pid = -1
        self._current = 0
        self._lock = threading.Lock()

    @property
    def location(self) -> str:
        return self.settings.location

    @property
    def sentinel(self) -> bool:
        """True when the master is found through Sentinels (a failover can happen)."""
        return any(endpoint.sentinels for endpoint in self.settings.endpoints)

    def client(self) -> redis.Redis:
        client = self._client
        if client is not None and self._pid == os.getpid():
            return client
        with self._lock:
            if self._client is None or self._pid != os.getpid():
                self._client, self._sentinel = self._connect()  # the parent's is dropped, never closed here
                self._pid = os.getpid()
            return self._client

    def _connect(self) -> tuple[redis.Redis, Sentinel | None]:
        endpoints = self.settings.endpoints
        if len(endpoints) == 1:
            return endpoints[0].client(self._timeout_s)  # connects lazily, on the first command
        failures: list[str] = []
        for step in range(len(endpoints)):
            index = (self._current + step) % len(endpoints)
            client, sentinel = endpoints[index].client(self._timeout_s)
            try:
                client.ping()
            except redis.RedisError as exc:
                _close(client, sentinel)
                failures.append(f"#{index + 1}: {type(exc).__name__}: {redact_url(str(exc))}")
                continue
            self._current = index
            return client, sentinel
        raise redis.ConnectionError(f"no broker of the failover list {self.location} answered ({'; '.join(failures)})")

    def close(self) -> None:
        """Drop the connections (the next ``client()`` reconnects); a forked child leaves its parent's alone."""
        with self._lock:
            if self._client is not None and self._pid == os.getpid():
                _close(self._client, self._sentinel)
            self._client = self._sentinel = None


def _close(client: redis.Redis, sentinel: Sentinel | None) -> None:
    client.close()
    client.connection_pool.disconnect()
    if sentinel is not None:
        for node in sentinel.sentinels:
            node.close()


_settings_by_app: weakref.WeakKeyDictionary[Celery, tuple[str, RedisSettings]] = weakref.WeakKeyDictionary()
_settings_lock = threading.Lock()


def redis_settings(celery_app: Celery) -> RedisSettings:
    """The Redis settings of ``celery_app``'s broker, parsed once per app (again if its broker settings change)."""
    conf = celery_app.conf
    url = str(conf.broker_write_url)
    key = repr((url, conf.broker_use_ssl, conf.broker_transport_options, conf.broker_user, conf.broker_password))
    cached = _settings_by_app.get(celery_app)
    if cached is not None and cached[0] == key:
        return cached[1]
    with _settings_lock:
        settings = _settings_from(celery_app.connection_for_write(), url)
        _settings_by_app[celery_app] = (key, settings)
    return settings


def redis_settings_for_url(url: str) -> RedisSettings:
    """Settings for a Redis that is not the broker (``failed_store_url``): the URL alone, parsed as kombu does."""
    return _settings_from(Connection(url), url)


def _settings_from(connection: Connection, url: str) -> RedisSettings:
    transport = str(connection.transport_cls)
    if transport not in REDIS_TRANSPORTS:
        raise BrokerSettingError(
            f"broker_url {redact_url(url)!r} is not a Redis broker (kombu transport {transport!r})"
        )
    options: dict[str, Any] = dict(connection.transport_options or {})
    misplaced = sorted({"username", "password"} & set(options))
    if misplaced:  # kombu never reads them there: Celery would connect without them
        raise BrokerSettingError(
            f"broker_transport_options {misplaced} are not read by kombu's Redis transport; put the user and "
            "password in broker_url (redis://user:password@host/0) or in broker_user / broker_password"
        )
    alternates = [str(a) for a in connection.alt] or [url]
    if transport == "sentinel":
        endpoints: tuple[_Endpoint, ...] = (_sentinel_endpoint(connection, alternates, options),)
    else:
        endpoints = tuple(_server_endpoint(connection, alt, options, transport) for alt in alternates)
    return RedisSettings(endpoints, str(options.get("global_keyprefix") or ""), redact_url(url))


def _server_endpoint(connection: Connection, alternate: str, options: dict[str, Any], transport: str) -> _Endpoint:
    if len(connection.alt) > 1:
        connection.switch(alternate)  # kombu's own re-parse of each failover URL (nothing is opened)
        if str(connection.transport_cls) != transport:
            raise BrokerSettingError(
                f"broker_url: every URL of a failover list must use the same broker; {redact_url(alternate)!r} "
                f"is {connection.transport_cls!r}, the first is {transport!r}"
            )
    return _Endpoint(_pool_kwargs(connection, options, transport))


def _sentinel_endpoint(connection: Connection, alternates: list[str], options: dict[str, Any]) -> _Endpoint:
    master_name = options.get("master_name")
    if not master_name:
        raise BrokerSettingError(
            "a sentinel:// broker needs broker_transport_options={'master_name': ...}: the name of the "
            "Redis group the Sentinels watch (as kombu requires)"
        )
    kwargs = _pool_kwargs(connection, options, "sentinel")
    sentinels = []
    for alternate in alternates:
        parts = url_to_parts(alternate)
        if parts.scheme == "sentinel":
            sentinels.append((parts.hostname or "127.0.0.1", int(parts.port or _DEFAULT_PORTS["sentinel"])))
    if not sentinels:
        sentinels.append((kwargs["host"], kwargs["port"]))
    kwargs.pop("host", None)
    kwargs.pop("port", None)
    ssl = kwargs.get("connection_class") is redis.SSLConnection
    kwargs["connection_class"] = SentinelManagedSSLConnection if ssl else SentinelManagedConnection
    sentinel_options = {
        "min_other_sentinels": int(options.get("min_other_sentinels") or 0),
        "sentinel_kwargs": options.get("sentinel_kwargs"),
    }
    return _Endpoint(kwargs, tuple(sentinels), str(master_name), sentinel_options)


def _pool_kwargs(connection: Connection, options: dict[str, Any], transport: str) -> dict[str, Any]:
    """kombu's ``Channel._connparams`` for this connection, checked: the redis-py pool arguments."""
    kwargs: dict[str, Any] = {
        "host": connection.hostname or "127.0.0.1",
        "port": connection.port or _DEFAULT_PORTS[transport],
        "username": connection.userid,
        "password": connection.password,
        "max_connections": None,  # kombu bounds its own channel's pool; ours serve other threads
        "health_check_interval": _KOMBU_HEALTH_CHECK_INTERVAL_S,
    }
    for name in _POOL_OPTIONS:
        if options.get(name) is not None:
            kwargs[name] = options[name]
    _credential_provider(getattr(connection, "credential_provider", None), kwargs)  # kombu 5.6+ (celery/kombu#2408)
    kwargs.update(_ssl_kwargs(connection.ssl))
    virtual_host = connection.virtual_host
    host = str(kwargs["host"])
    if "://" in host:  # redis+socket:///path/to/redis.sock
        parts = url_to_parts(host)
        if parts.scheme == "socket":
            for name in ("host", "port", "socket_keepalive", "socket_keepalive_options"):
                kwargs.pop(name, None)
            kwargs.update({"connection_class": redis.UnixDomainSocketConnection, "path": "/" + (parts.path or "")})
            kwargs.update({k: v for k, v in parts.query.items() if k != "credential_provider"})
        kwargs["username"], kwargs["password"] = parts.username, parts.password
        _credential_provider(parts.query.get("credential_provider"), kwargs)
    kwargs["db"] = _database(kwargs.pop("virtual_host", virtual_host))
    return kwargs


def _credential_provider(provider: Any, kwargs: dict[str, Any]) -> None:
    if not provider:
        return
    if isinstance(provider, str):
        provider = symbol_by_name(provider)()
    if not isinstance(provider, redis.CredentialProvider):
        raise BrokerSettingError("the broker's credential_provider must be a redis.CredentialProvider (as kombu's)")
    kwargs["credential_provider"] = provider
    kwargs.pop("username", None)
    kwargs.pop("password", None)


def _ssl_kwargs(ssl: Any) -> dict[str, Any]:
    if not ssl:
        return {}
    if not isinstance(ssl, dict):
        # kombu's Redis transport ignores a non-dict broker_use_ssl and connects in clear text.
        raise BrokerSettingError(
            f"broker_use_ssl={ssl!r} on a Redis broker: kombu's Redis transport needs a dict such as "
            "{'ssl_cert_reqs': ssl.CERT_REQUIRED, 'ssl_ca_certs': '/path/ca.pem'} (True alone connects without TLS)"
        )
    unknown = sorted(set(ssl) - _SSL_KEYS)
    if unknown:
        raise BrokerSettingError(f"broker_use_ssl keys {unknown} are not redis-py TLS options; use {sorted(_SSL_KEYS)}")
    try:
        redis.SSLConnection(**ssl)  # checks the values (ssl_cert_reqs ...) without connecting
    except (redis.RedisError, TypeError, ValueError) as exc:
        raise BrokerSettingError(f"broker_use_ssl: {exc}") from None
    return {**ssl, "connection_class": redis.SSLConnection}


def _database(virtual_host: Any) -> int:
    """kombu's ``_prepare_virtual_host``: the URL path is the database number."""
    if isinstance(virtual_host, int):
        return virtual_host
    text = str(virtual_host or "").removeprefix("/")
    if not text:
        return 0
    try:
        return int(text)
    except ValueError:
        raise BrokerSettingError(
            f"broker_url: the path of a Redis URL is the database number (0, 1, ...), not {text!r}"
        ) from None
