"""Flower shows events as a Celery user expects: a real worker (-E), a real Flower, its HTTP API.

Both run with the exact commands of docker-compose.yml (Flower on a free port, on the private Redis).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from litestar.testing import TestClient

from litestar_celery_events import CeleryEventEmitter
from tests.apps.recording import create_app
from tests.helpers import ROOT, LoggedProcess, free_port, http_get, http_up, wait_for

pytestmark = pytest.mark.integration

AUTH = ("ops", "flower-test-password")
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


def _compose_command(service: str) -> list[str]:
    command: list[str] = COMPOSE[service]["command"]
    assert command[0] == "celery"
    return [sys.executable, "-m", *command]


@pytest.fixture
def env(redis_url: str, use_env: Callable[..., dict[str, str]]) -> dict[str, str]:
    return use_env(redis_url)


@pytest.fixture
def flower(env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    """Worker and Flower, started as docker-compose.yml starts them; yields Flower's base URL."""
    port = free_port()
    queues = f"{os.environ['TEST_QUEUE']},{os.environ['ROUTED_QUEUE']}"
    worker_argv = [*_compose_command("worker"), "--concurrency", "2", "--queues", queues, "--without-mingle"]
    flower_argv = [*_compose_command("flower"), f"--port={port}", "--address=127.0.0.1"]
    worker = LoggedProcess(worker_argv, env, tmp_path / "worker.log")
    flower = LoggedProcess(flower_argv, {**env, "FLOWER_BASIC_AUTH": ":".join(AUTH)}, tmp_path / "flower.log")
    base = f"http://127.0.0.1:{port}"
    try:
        worker.wait_output("ready.")
        wait_for(lambda: http_up(f"{base}/healthcheck"), timeout=60, what="Flower to listen")
        yield base
    finally:
        flower.stop()
        worker.stop()


def _tasks(base: str) -> dict[str, dict[str, Any]]:
    status, tasks = http_get(f"{base}/api/tasks", auth=AUTH)
    assert status == 200, tasks
    return tasks  # type: ignore[no-any-return]


def _named(tasks: dict[str, dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [task for task in tasks.values() if task.get("name") == name]


def _flower_is_listening(base: str, emitter: CeleryEventEmitter) -> bool:
    """Task events are broadcast: emit a warm-up event until Flower has seen one."""
    if _named(_tasks(base), "events.password_changed"):
        return True
    emitter.emit("password_changed", email="warm-up@example.com")
    time.sleep(0.5)
    return False


def test_flower_lists_each_event_and_listener_task_with_args_retries_and_failures(
    flower: str, env: dict[str, str]
) -> None:
    app = create_app()
    with TestClient(app) as client:
        emitter = app.event_emitter
        assert isinstance(emitter, CeleryEventEmitter)
        wait_for(lambda: _flower_is_listening(flower, emitter), timeout=60, what="Flower to receive task events")
        assert client.post("/users", json={"email": "ada@example.com"}).status_code == 201
        created = emitter.enqueue("user_created", email="grace@example.com")
        order = emitter.enqueue("order_placed", order_id=7)
        failing = emitter.enqueue("always_fails", n=1)

    flaky = "events.order_placed[tests.apps.recording.flaky_listener]"
    doomed = "events.always_fails[tests.apps.recording.always_fails]"

    def settled() -> dict[str, dict[str, Any]] | None:
        tasks = _tasks(flower)
        done = (
            tasks.get(created, {}).get("state") == "SUCCESS"
            and any(t["state"] == "SUCCESS" for t in _named(tasks, flaky))
            and any(t["state"] == "FAILURE" for t in _named(tasks, doomed))
        )
        return tasks if done else None

    tasks = wait_for(settled, timeout=60, interval=0.5, what="Flower to show the events settled")

    # One task per emission, named by its event, its id the emission id, its arguments readable.
    event = tasks[created]
    assert event["name"] == "events.user_created"
    assert "grace@example.com" in event["kwargs"]
    assert event["args"] == "()"
    assert any("ada@example.com" in t["kwargs"] for t in _named(tasks, "events.user_created"))
    assert tasks[order]["name"] == "events.order_placed"
    assert "'order_id': 7" in tasks[order]["kwargs"]

    # A failing listener is retried as a task of its own, named by event and listener.
    (retried,) = _named(tasks, flaky)
    assert retried["uuid"] == f"{order}:tests.apps.recording.flaky_listener"
    assert retried["retries"] >= 1
    assert "payment service unavailable" in retried["exception"]  # the last error, kept after the retry
    assert "'order_id': 7" in retried["kwargs"]
    routed = _named(tasks, "events.order_placed[tests.apps.recording.routed_listener]")
    assert routed, "a routed listener shows as its own task"

    # Retries exhausted: FAILURE with the exception, the emission id in the task id.
    (failed,) = _named(tasks, doomed)
    assert failed["uuid"].startswith(failing)
    assert "boom 1" in failed["exception"]
    assert tasks[failing]["state"] == "SUCCESS"  # the event task itself handed the listener on

    # The task detail page's API agrees, behind the same auth.
    status, info = http_get(f"{flower}/api/task/info/{created}", auth=AUTH)
    assert status == 200
    assert info["name"] == "events.user_created"
    assert http_get(f"{flower}/api/task/info/{created}")[0] == 401

    # docker-compose.yml's healthchecks of the worker and Flower pass against these processes.
    for service in ("worker", "flower"):
        check = _healthcheck(service, flower_port=int(flower.rsplit(":", 1)[1]))
        assert check.returncode == 0, f"{service} healthcheck failed: {check.stdout}{check.stderr}"


def _healthcheck(service: str, flower_port: int) -> subprocess.CompletedProcess[str]:
    """Run the service's compose healthcheck here ($$ is compose's escaped $; python is this venv's)."""
    kind, *command = COMPOSE[service]["healthcheck"]["test"]
    if kind == "CMD-SHELL":
        argv = ["sh", "-c", command[0].replace("$$", "$").replace("celery ", f"{sys.executable} -m celery ", 1)]
    else:
        argv = [sys.executable if command[0] == "python" else command[0], *command[1:]]
    argv = [arg.replace("127.0.0.1:5555", f"127.0.0.1:{flower_port}") for arg in argv]
    env = {**os.environ, "HOSTNAME": socket.gethostname()}
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
