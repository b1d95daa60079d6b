"""``litestar --app APP events worker|beat|flower``: real Celery processes started from the Litestar CLI."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from litestar.testing import TestClient

from tests.apps.recording import create_app
from tests.helpers import LoggedProcess, free_port, http_get, http_up, runs_of, wait_for

pytestmark = pytest.mark.integration

APP = "tests.apps.recording:create_app"
LITESTAR = [sys.executable, "-m", "litestar", "--app", APP, "events"]


@pytest.fixture
def env(redis_url: str, use_env: Callable[..., dict[str, str]], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.delenv("FLOWER_BASIC_AUTH", raising=False)
    return use_env(redis_url, app=None)


def test_events_worker_runs_the_listeners_of_the_app_named_by_litestar_app(env: dict[str, str], tmp_path: Path) -> None:
    worker = LoggedProcess(
        [*LITESTAR, "worker", "--loglevel", "INFO", "--concurrency", "1", "--without-gossip", "--without-mingle"],
        env,
        tmp_path / "worker.log",
    )
    try:
        worker.wait_output("ready.")
        app = create_app()
        with TestClient(app) as client:
            assert client.post("/users", json={"email": "cli@example.com"}).status_code == 201
        records = Path(env["RECORD_FILE"])
        wait_for(lambda: runs_of(records, "send_welcome_email_handler"), what="the listener to run in the worker")
        run = runs_of(records, "send_welcome_email_handler")[0]
        assert run["kwargs"] == {"email": "cli@example.com"}
        assert run["pid"] != os.getpid()
        assert f"running: LITESTAR_APP={APP} celery -A worker worker" in worker.output()
        assert "events.user_created" in worker.output()  # the worker's task list names the app's events
    finally:
        worker.stop()


def test_events_beat_starts_celery_beat_for_the_app(env: dict[str, str], tmp_path: Path) -> None:
    beat = LoggedProcess(
        [*LITESTAR, "beat", "--loglevel", "INFO", "--schedule", str(tmp_path / "beat-schedule")],
        env,
        tmp_path / "beat.log",
    )
    try:
        beat.wait_output("beat: Starting...")
        host_and_port = env["CELERY_BROKER_URL"].removeprefix("redis://").removesuffix("/0")
        assert host_and_port in beat.output()  # the broker of the app's config
    finally:
        beat.stop()


def test_events_flower_refuses_to_run_without_authentication(env: dict[str, str], tmp_path: Path) -> None:
    flower = LoggedProcess([*LITESTAR, "flower", "--port", "1"], env, tmp_path / "flower.log")
    try:
        assert flower.proc.wait(60) != 0
        assert "FLOWER_BASIC_AUTH" in flower.output()
    finally:
        flower.stop()


def test_events_flower_serves_its_api_behind_basic_auth(env: dict[str, str], tmp_path: Path) -> None:
    port = free_port()
    flower = LoggedProcess(
        [*LITESTAR, "flower", f"--port={port}", "--address=127.0.0.1"],
        {**env, "FLOWER_BASIC_AUTH": "ops:s3cret"},
        tmp_path / "flower.log",
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: http_up(f"{base}/healthcheck"), timeout=60, what="Flower to listen")
        assert http_get(f"{base}/api/tasks")[0] == 401
        assert http_get(f"{base}/", auth=("ops", "wrong"))[0] == 401
        status, tasks = http_get(f"{base}/api/tasks", auth=("ops", "s3cret"))
        assert status == 200
        assert isinstance(tasks, dict)
        assert "flower --tasks_columns=name,uuid,state,args,kwargs," in flower.output()  # arguments shown
    finally:
        flower.stop()
