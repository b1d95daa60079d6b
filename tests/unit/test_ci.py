"""The CI definitions run what they claim: GitHub runs the command .ci/run runs, with the brokers the
tests use, and the lowest-versions run installs exactly the floors pyproject.toml declares."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10, the lowest supported: pytest itself depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW: dict[Any, Any] = yaml.safe_load((ROOT / ".github" / "workflows" / "ci.yml").read_text())
WORKFLOW["on"] = WORKFLOW.pop(True)  # YAML 1.1 reads the key `on` as a boolean; GitHub reads it as "on"
WORKFLOW_SCHEMA = json.loads((ROOT / "tests" / "ci" / "github-workflow.json").read_text())
JOBS: dict[str, dict[str, Any]] = WORKFLOW["jobs"]
PROJECT: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
LOWEST_PINS = ROOT / "ci" / "lowest-versions.txt"


def _runs(job: dict[str, Any]) -> list[str]:
    return [step["run"].strip() for step in job["steps"] if "run" in step]


def _python_versions(job: dict[str, Any]) -> list[str]:
    [setup] = [step for step in job["steps"] if str(step.get("uses", "")).startswith("actions/setup-python@")]
    return str(setup["with"]["python-version"]).split()


def _ci_run_command() -> str:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    return [line for line in lines if line.strip() and not line.startswith("#")][-1].strip()


def _floors() -> dict[str, Version]:
    floors: dict[str, Version] = {}
    for line in PROJECT["dependencies"]:
        requirement = Requirement(line)
        [specifier] = requirement.specifier
        assert specifier.operator == ">=", f"{line}: a dependency's lower bound is its tested floor"
        floors[canonicalize_name(requirement.name)] = Version(specifier.version)
    return floors


def _lowest_pins() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in LOWEST_PINS.read_text().splitlines():
        pin = line.split("#")[0].strip()
        if "==" in pin:
            name, version = pin.split("==")
            pins[canonicalize_name(name.split("[")[0])] = Version(version)
    return pins


def test_the_workflow_is_valid_under_the_github_workflow_schema() -> None:
    validator = jsonschema.Draft7Validator(WORKFLOW_SCHEMA)
    errors = sorted(validator.iter_errors(WORKFLOW), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)
    broken = {**WORKFLOW, "jobs": {"test": {**JOBS["test"], "runs_on": "ubuntu-24.04"}}}
    assert not validator.is_valid(broken)


def test_the_github_test_job_runs_the_command_ci_run_and_the_readme_give() -> None:
    command = _ci_run_command()
    assert command == "make test"
    assert re.search(rf"^{command} +#", (ROOT / "README.md").read_text(), re.MULTILINE)
    assert _runs(JOBS["test"]) == [command]
    assert _python_versions(JOBS["test"])[-1] == "3.11"  # the last one listed is `python3`


def test_the_github_test_job_has_the_brokers_and_database_the_tests_expect() -> None:
    assert WORKFLOW["env"]["CI"] == "true"  # a test that cannot reach its broker fails instead of skipping
    services = JOBS["test"]["services"]
    images = {name: service["image"].split(":")[0] for name, service in services.items()}
    assert images == {"redis": "redis", "rabbitmq": "rabbitmq", "postgres": "postgres"}
    ports = {name: service["ports"] for name, service in services.items()}
    assert ports == {"redis": ["6379:6379"], "rabbitmq": ["5672:5672"], "postgres": ["5432:5432"]}
    assert services["postgres"]["env"]["POSTGRES_HOST_AUTH_METHOD"] == "trust"  # user postgres, no password
    for service in services.values():
        assert "--health-cmd" in service["options"], "steps must wait until the service answers"


def test_the_lowest_job_runs_make_test_lowest_on_the_lowest_supported_python() -> None:
    lowest_python = PROJECT["requires-python"].removeprefix(">=")
    assert _python_versions(JOBS["lowest"]) == [lowest_python]
    assert _runs(JOBS["lowest"]) == [f"make test-lowest LOWEST_PYTHON=python{lowest_python}"]
    assert lowest_python in _python_versions(JOBS["test"])  # make test's own lowest run uses it too


def test_make_test_ends_with_the_lowest_versions_run_on_the_pinned_floors() -> None:
    makefile = (ROOT / "Makefile").read_text()
    test_recipe = re.search(r"^test: lint\n((?:\t.*\n)+)", makefile, re.MULTILINE)
    assert test_recipe is not None
    assert test_recipe.group(1).splitlines()[-1].split()[-1] == "test-lowest"
    assert "-r ci/lowest-versions.txt" in makefile


def test_the_lowest_run_pins_every_dependency_exactly_at_the_floor_pyproject_declares() -> None:
    floors, pins = _floors(), _lowest_pins()
    assert set(floors) == set(pins)
    for name, floor in floors.items():
        assert pins[name] == floor, f"{name}: pyproject.toml says >={floor}, the lowest run tests {pins[name]}"
