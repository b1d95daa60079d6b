"""The Redis client factory reads the broker settings the way kombu does, and refuses what it cannot honour."""

from __future__ import annotations

import os
import ssl
import warnings
from typing import Any

import pytest
import redis
from celery import Celery
from redis.sentinel import SentinelManagedSSLConnection

from litestar_celery_events.brokers import (
    BrokerSettingError,
    is_redis_url,
    redact_url,
    redis_settings,
    redis_settings_for_url,
)
from litestar_celery_events.stores.schedule import RedisScheduleStore
from litestar_celery_events.stores.state import StateStore, schedule_store_for
from litestar_celery_events.transports import transport_for
from litestar_celery_events.transports.redis import RedisTransport


def _app(url: str, **settings: Any) -> Celery:
    app = Celery(set_as_current=False)
    app.conf.update(broker_url=url, **settings)
    return app


def _kwargs(url: str, **settings: Any) -> list[dict[str, Any]]:
    return [e.pool_kwargs for e in redis_settings(_app(url, **settings)).endpoints]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://h/0", True),
        ("rediss://h:6380/0?ssl_cert_reqs=CERT_NONE", True),
        ("redis+socket:///tmp/r.sock", True),
        ("sentinel://h:26379;sentinel://g:26379", True),
        ("amqp://guest@h//", False),
        ("filesystem://", False),
        ("", False),
    ],
)
def test_redis_urls_are_those_kombus_redis_transport_serves(url: str, expected: bool) -> None:
    assert is_redis_url(url) is expected


def test_broker_use_ssl_gives_a_tls_connection_with_kombus_keys() -> None:
    tls = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": "/ca.pem", "ssl_certfile": "/c.pem", "ssl_keyfile": "/k"}
    [kwargs] = _kwargs("redis://h:6380/2", broker_use_ssl=tls)
    assert kwargs["connection_class"] is redis.SSLConnection
    assert {k: kwargs[k] for k in tls} == tls
    assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("h", 6380, 2)


@pytest.mark.parametrize(
    ("query", "expected"),
    [("CERT_NONE", ssl.CERT_NONE), ("none", ssl.CERT_NONE), ("required", ssl.CERT_REQUIRED), (None, ssl.CERT_NONE)],
)
def test_rediss_query_spellings_are_read_as_kombu_reads_them(query: str | None, expected: int) -> None:
    url = "rediss://:pw@h:6380/0" + (f"?ssl_cert_reqs={query}" if query else "")
    [kwargs] = _kwargs(url)  # no query at all: kombu's insecure default, with its warning
    assert kwargs["connection_class"] is redis.SSLConnection
    assert kwargs["ssl_cert_reqs"] == expected
    assert kwargs["password"] == "pw"


def test_transport_options_and_credentials_reach_redis_py() -> None:
    options = {
        "socket_timeout": 3.0,
        "socket_connect_timeout": 1.5,
        "socket_keepalive": True,
        "health_check_interval": 7,
        "max_connections": 4,
        "client_name": "web",
        "global_keyprefix": "t1:",
    }
    app = _app("redis://h/0", broker_transport_options=options, broker_user="alice", broker_password="s3cret")
    settings = redis_settings(app)
    [endpoint] = settings.endpoints
    kwargs = endpoint.pool_kwargs
    assert {k: kwargs[k] for k in options if k != "global_keyprefix"} == {
        k: v for k, v in options.items() if k != "global_keyprefix"
    }
    assert (kwargs["username"], kwargs["password"]) == ("alice", "s3cret")
    assert settings.global_keyprefix == "t1:"
    assert "s3cret" not in repr(settings)
    client = settings.open().client()
    pool_kwargs = client.connection_pool.connection_kwargs
    assert (pool_kwargs["socket_timeout"], pool_kwargs["socket_connect_timeout"]) == (3.0, 1.5)
    assert settings.open(timeout_s=0.5).client().connection_pool.connection_kwargs["socket_timeout"] == 0.5


def test_a_failover_list_gives_one_endpoint_per_url_in_order() -> None:
    kwargs = _kwargs("redis://:a@down:1/0;redis://up:2/3")
    assert [(k["host"], k["port"], k["db"], k["password"]) for k in kwargs] == [
        ("down", 1, 0, "a"),
        ("up", 2, 3, None),
    ]


def test_a_unix_socket_url_connects_to_the_socket() -> None:
    [kwargs] = _kwargs("redis+socket:///run/redis.sock")
    assert kwargs["connection_class"] is redis.UnixDomainSocketConnection
    assert kwargs["path"] == "/run/redis.sock"
    assert "host" not in kwargs


def test_sentinel_urls_make_one_sentinel_group_with_the_master_name() -> None:
    app = _app(
        "sentinel://:pw@s1:26379;sentinel://s2:26380",
        broker_transport_options={"master_name": "mymaster", "sentinel_kwargs": {"password": "sp"}},
        broker_use_ssl={"ssl_cert_reqs": ssl.CERT_NONE},
    )
    [endpoint] = redis_settings(app).endpoints
    assert endpoint.sentinels == (("s1", 26379), ("s2", 26380))
    assert endpoint.master_name == "mymaster"
    assert endpoint.sentinel_options["sentinel_kwargs"] == {"password": "sp"}
    assert endpoint.pool_kwargs["connection_class"] is SentinelManagedSSLConnection


@pytest.mark.parametrize(
    ("url", "settings", "named"),
    [
        ("sentinel://s1:26379", {}, "master_name"),
        ("redis://h/0", {"broker_use_ssl": True}, "broker_use_ssl"),
        ("rediss://h/0", {"broker_use_ssl": {"cert_reqs": ssl.CERT_NONE}}, "cert_reqs"),
        ("rediss://h/0", {"broker_use_ssl": {"ssl_cert_reqs": "sometimes"}}, "broker_use_ssl"),
        ("redis://h/zero", {}, "database number"),
        ("redis://h/0;amqp://h//", {}, "failover list"),
        ("redis://h/0", {"broker_transport_options": {"password": "pw"}}, "broker_user / broker_password"),
    ],
)
def test_a_setting_kombu_would_use_but_the_library_cannot_is_refused_by_name(
    url: str, settings: dict[str, Any], named: str
) -> None:
    with pytest.raises(BrokerSettingError, match=named):
        redis_settings(_app(url, **settings))


def test_settings_are_parsed_once_per_app_and_again_when_the_broker_changes() -> None:
    app = _app("redis://h/0")
    first = redis_settings(app)
    assert redis_settings(app) is first
    app.conf.broker_url = "redis://g/0"
    assert redis_settings(app).endpoints[0].pool_kwargs["host"] == "g"
    app.conf.broker_transport_options = {"global_keyprefix": "x:"}
    assert redis_settings(app).global_keyprefix == "x:"


def test_a_client_made_before_a_fork_is_not_used_after_it() -> None:
    handle = redis_settings_for_url("redis://127.0.0.1:1/0").open()
    parent = handle.client()
    assert handle.client() is parent
    handle._pid = os.getpid() + 1  # as seen from a forked child
    child = handle.client()
    assert child is not parent


def test_a_forked_child_makes_its_own_client_and_leaves_the_parents_working(redis_url: str) -> None:
    handle = redis_settings_for_url(redis_url).open()
    parent = handle.client()
    parent.set("fork-rule", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork() in a process with threads
        pid = os.fork()
    if pid == 0:  # the child: report through the exit code only
        ok = False
        try:
            child = handle.client()
            ok = child is not parent and child.get("fork-rule") == b"1"
            handle.close()  # closes the child's own connections, never the parent's socket
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    try:
        assert os.waitstatus_to_exitcode(status) == 0
        assert handle.client() is parent
        assert parent.get("fork-rule") == b"1", "the parent's connection survived the child's close()"
    finally:
        parent.delete("fork-rule")
        handle.close()


def test_the_first_answering_server_of_a_failover_list_is_used(redis_url: str) -> None:
    up = redis_url.removeprefix("redis://")
    handle = redis_settings_for_url(f"redis://127.0.0.1:1/0;redis://{up}").open(timeout_s=1.0)
    try:
        client = handle.client()
        assert client.ping()
        assert client.connection_pool.connection_kwargs["port"] == int(up.split(":")[1].split("/")[0])
    finally:
        handle.close()


def test_no_answering_server_names_the_list_without_its_passwords() -> None:
    handle = redis_settings_for_url("redis://:hunter2@127.0.0.1:1/0;redis://:hunter2@127.0.0.1:2/0").open(1.0)
    with pytest.raises(redis.ConnectionError, match="failover list") as caught:
        handle.client()
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("redis://:a@h1:1/0;redis://u:b@h2:2/0", "redis://:***@h1:1/0;redis://u:***@h2:2/0"),
        ("sentinel://:pw@s1:26379;sentinel://:pw@s2:26379", "sentinel://:***@s1:26379;sentinel://:***@s2:26379"),
        ("rediss://:p@ss@h:6380/0?ssl_cert_reqs=CERT_NONE", "rediss://:***@h:6380/0?ssl_cert_reqs=CERT_NONE"),
        ('["redis://:a@h1", "redis://:b@h2"]', '["redis://:***@h1", "redis://:***@h2"]'),
    ],
)
def test_redact_url_handles_lists_and_queries(text: str, expected: str) -> None:
    assert redact_url(text) == expected


@pytest.mark.parametrize(
    ("url", "options"),
    [
        ("rediss://h:6380/0?ssl_cert_reqs=required", {}),
        ("redis+socket:///run/redis.sock", {}),
        ("sentinel://s1:26379;sentinel://s2:26379", {"master_name": "m"}),
        ("redis://a/0;redis://b/0", {}),
    ],
)
def test_every_redis_flavour_gets_the_fast_transport_and_the_broker_side_stores(
    url: str, options: dict[str, Any], tmp_path: Any
) -> None:
    app = _app(url, broker_transport_options=options)
    assert isinstance(transport_for(app), RedisTransport)
    assert isinstance(schedule_store_for(StateStore("local", "", local_dir=tmp_path), app), RedisScheduleStore)
