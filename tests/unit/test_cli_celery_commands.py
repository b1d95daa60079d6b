"""``litestar events worker|beat|flower``: the exact Celery command line, without starting Celery."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import pytest
from click.testing import CliRunner
from litestar.cli.main import litestar_group

APP = "tests.apps.recording:create_app"


@pytest.fixture
def execs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[tuple[list[str], dict[str, str]]]:
    calls: list[tuple[list[str], dict[str, str]]] = []

    def fake_execve(path: str, argv: list[str], env: dict[str, str]) -> NoReturn:
        calls.append((argv, env))
        raise SystemExit(0)

    monkeypatch.setattr(os, "execve", fake_execve)
    monkeypatch.setattr(os, "chdir", lambda _: None)
    monkeypatch.setenv("CELERY_EVENTS_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("FLOWER_BASIC_AUTH", raising=False)
    monkeypatch.delenv("FLOWER_TASKS_COLUMNS", raising=False)
    return calls


def _run(*args: str, env: dict[str, Any] | None = None) -> Any:
    return CliRunner().invoke(litestar_group, ["--app", APP, "events", *args], env=env, catch_exceptions=False)


@pytest.mark.parametrize("command", ["worker", "beat"])
def test_the_command_runs_celery_on_the_worker_module_with_every_option_passed_through(
    command: str, execs: list[tuple[list[str], dict[str, str]]]
) -> None:
    result = _run(command, "--loglevel", "INFO", "-E", "--concurrency=4")
    assert result.exit_code == 0, result.output
    ((argv, env),) = execs
    assert argv == [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker",
        command,
        "--loglevel",
        "INFO",
        "-E",
        "--concurrency=4",
    ]
    assert env["LITESTAR_APP"] == APP
    assert env["PYTHONPATH"].split(os.pathsep)[0] == os.getcwd()


def test_flower_without_credentials_is_refused_and_nothing_runs(execs: list[tuple[list[str], dict[str, str]]]) -> None:
    result = _run("flower", "--port=5555")
    assert result.exit_code == 1
    assert "FLOWER_BASIC_AUTH" in result.output
    assert execs == []


@pytest.mark.parametrize(
    ("args", "env"),
    [
        pytest.param(["--port=5555"], {"FLOWER_BASIC_AUTH": "a:b"}, id="env"),
        pytest.param(["--basic-auth=a:b", "--port=5555"], {}, id="option"),
        pytest.param(["--no-auth", "--port=5555"], {}, id="open-on-purpose"),
    ],
)
def test_flower_runs_with_credentials_or_on_purpose_and_lists_event_arguments(
    args: list[str], env: dict[str, str], execs: list[tuple[list[str], dict[str, str]]]
) -> None:
    result = _run("flower", *args, env=env)
    assert result.exit_code == 0, result.output
    ((argv, _),) = execs
    assert argv[5] == "flower"
    assert argv[6].startswith("--tasks_columns=name,uuid,state,args,kwargs")
    assert "--port=5555" in argv
    assert "--no-auth" not in argv


def test_an_explicit_tasks_columns_option_is_kept(execs: list[tuple[list[str], dict[str, str]]]) -> None:
    _run("flower", "--no-auth", "--tasks_columns=name,state")
    ((argv, _),) = execs
    assert [a for a in argv if a.startswith("--tasks")] == ["--tasks_columns=name,state"]
