"""docker-compose.yml and the Dockerfile, checked without a Docker engine.

The file must be valid under the Compose specification's JSON schema (vendored in tests/compose/),
every service runs a command the README documents, every environment variable it sets is one the
library, the worker module or Flower reads, and Flower is never open.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from flower.options import options as flower_options

from litestar_celery_events.cli import FLOWER_TASKS_COLUMNS
from litestar_celery_events.config import BROKER_URL_ENV, DATA_DIR_ENV, LITESTAR_APP_ENV, LOG_FORMAT_ENV
from tests.helpers import needs_advanced_alchemy

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((ROOT / "tests" / "compose" / "compose-spec.json").read_text())
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
OUR_SERVICES = {name: service for name, service in SERVICES.items() if "build" in service}
README = (ROOT / "README.md").read_text()
INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Z_][A-Z0-9_]*)(?P<modifier>:?[-?][^}]*)?\}")


def _validator() -> jsonschema.Draft201909Validator:
    return jsonschema.Draft201909Validator(SCHEMA)


def _command(service: dict[str, Any]) -> str:
    command = service["command"]
    return command if isinstance(command, str) else shlex.join(command)


def _known_env_names() -> set[str]:
    flower = {f"FLOWER_{name.replace('-', '_').upper()}" for name in flower_options._options}
    return {BROKER_URL_ENV, DATA_DIR_ENV, LITESTAR_APP_ENV, LOG_FORMAT_ENV} | flower


def test_compose_file_is_valid_under_the_compose_specification_schema() -> None:
    errors = sorted(_validator().iter_errors(COMPOSE), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_the_schema_check_rejects_a_broken_file() -> None:
    broken = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    broken["services"]["web"]["healthcheck"]["every"] = "10s"
    assert not _validator().is_valid(broken)


def test_the_stack_has_redis_web_worker_beat_and_flower_each_with_a_healthcheck() -> None:
    assert set(SERVICES) == {"redis", "web", "worker", "beat", "flower"}
    for name, service in SERVICES.items():
        assert service.get("healthcheck", {}).get("test"), f"service {name} has no healthcheck"
    for name, service in OUR_SERVICES.items():
        assert service["depends_on"]["redis"]["condition"] == "service_healthy", name


@pytest.mark.parametrize("service", sorted(OUR_SERVICES))
def test_every_service_runs_a_command_the_readme_documents(service: str) -> None:
    command = _command(OUR_SERVICES[service])
    assert command in README, f"the README does not document {service}'s command: {command}"


def test_celery_services_run_the_worker_module_and_the_web_service_serves_the_demo_app() -> None:
    for name in ("worker", "beat", "flower"):
        assert OUR_SERVICES[name]["command"][:4] == ["celery", "-A", "worker", name]
    assert "-E" in OUR_SERVICES["worker"]["command"], "Flower needs the worker's task events"
    assert OUR_SERVICES["web"]["command"][:2] == ["uvicorn", "demo.app:app"]


def test_all_services_share_one_environment() -> None:
    environments = [
        {name: value for name, value in service["environment"].items() if not name.startswith("FLOWER_")}
        for service in OUR_SERVICES.values()
    ]
    assert all(env == environments[0] for env in environments)
    assert environments[0][BROKER_URL_ENV].endswith("redis://redis:6379/0}")


def test_every_environment_name_is_one_the_config_the_worker_module_or_flower_reads() -> None:
    known = _known_env_names()
    names = {name for service in OUR_SERVICES.values() for name in service["environment"]}
    names |= {m["name"] for m in INTERPOLATION.finditer((ROOT / "docker-compose.yml").read_text())}
    assert names <= known, f"unknown environment names: {sorted(names - known)}"


def test_flower_needs_basic_auth_from_the_environment_and_listens_on_loopback_only() -> None:
    flower = OUR_SERVICES["flower"]
    auth = flower["environment"]["FLOWER_BASIC_AUTH"]
    match = INTERPOLATION.fullmatch(auth)
    assert match and match["name"] == "FLOWER_BASIC_AUTH"
    assert (match["modifier"] or "").startswith(":?"), "compose must refuse to start Flower without credentials"
    assert all(str(port).startswith("127.0.0.1:") for port in flower["ports"])
    assert "FLOWER_BASIC_AUTH" in _known_env_names(), "Flower reads its options from FLOWER_* variables"


def test_flower_lists_the_arguments_retries_and_errors_of_each_event_as_the_cli_does() -> None:
    assert OUR_SERVICES["flower"]["environment"]["FLOWER_TASKS_COLUMNS"] == FLOWER_TASKS_COLUMNS
    assert {"args", "kwargs", "retries", "exception"} <= set(FLOWER_TASKS_COLUMNS.split(","))


def test_dockerfile_copies_files_that_exist_and_installs_extras_that_exist() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), f"Dockerfile copies a missing path: {source}"
    pyproject = (ROOT / "pyproject.toml").read_text()
    for extra in re.findall(r"'\.\[(\w+)\]'", dockerfile):
        assert re.search(rf"^{extra} = \[", pyproject, re.MULTILINE), f"pyproject.toml has no extra {extra!r}"
    cmd = json.loads(dockerfile.split("\nCMD ", 1)[1].splitlines()[0])
    assert cmd == OUR_SERVICES["web"]["command"]


@needs_advanced_alchemy  # the demo app keeps its users in a database
def test_the_web_healthcheck_asks_for_a_page_the_demo_app_serves() -> None:
    from litestar.testing import TestClient

    from demo.app import app

    check = " ".join(OUR_SERVICES["web"]["healthcheck"]["test"])
    match = re.search(r"http://127\.0\.0\.1:8000(?P<path>/[^'\s]*)", check)
    assert match, check
    response = TestClient(app).get(match["path"])  # no lifespan: nothing is emitted
    assert response.status_code == 200
