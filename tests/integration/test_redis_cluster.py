"""Redis Cluster is refused at start-up, never half-working: a real one-node cluster and a real worker."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from tests.helpers import CeleryProcess, free_port, port_open, redis_server_binary, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster_url(tmp_path: Path) -> Iterator[str]:
    """A one-node Redis Cluster serving every slot: kombu's transport works on it, the store's scripts would not."""
    port = free_port()
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--cluster-enabled", "yes"]
    args += ["--cluster-port", str(free_port())]  # the default, port + 10000, may be taken or past 65535
    proc = subprocess.Popen(
        [redis_server_binary(), *args],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: port_open(port), timeout=10, what="redis-server in cluster mode")
        client = redis.Redis(port=port)
        client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        wait_for(lambda: client.info("cluster")["cluster_enabled"] == 1, timeout=10, what="cluster mode")
        wait_for(lambda: b"cluster_state:ok" in client.execute_command("CLUSTER", "INFO"), timeout=20, what="slots")
        client.close()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("command", [["worker", "--concurrency", "1"], ["beat"]], ids=["worker", "beat"])
def test_a_worker_or_beat_on_a_redis_cluster_stops_at_start_up_naming_the_reason(
    command: list[str], cluster_url: str, use_env: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    env = use_env(cluster_url)
    process = CeleryProcess([*command, "--loglevel", "INFO"], env, tmp_path / "celery.log")
    try:
        wait_for(lambda: process.proc.poll() is not None, timeout=60, what=f"celery {command[0]} to stop")
    finally:
        process.stop()
    log = process.output()
    assert "RedisClusterUnsupportedError" in log
    assert "need one Redis server" in log
    if command[0] == "worker":
        assert " ready." not in log  # it never consumed
