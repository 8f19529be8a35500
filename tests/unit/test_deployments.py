"""prefect.yaml: deployments a worker on another machine can run."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import yaml

from agent.config import PROJECT_ROOT


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _deployments() -> list[dict[str, Any]]:
    return yaml.safe_load((PROJECT_ROOT / "prefect.yaml").read_text())["deployments"]


def test_deployments_name_no_path_of_the_deploying_machine() -> None:
    for deployment in _deployments():
        assert not [s for s in _strings(deployment) if s.startswith("/") or "LAGENT_PROJECT_DIR" in s], deployment


def test_each_deployment_clones_the_repository_and_works_inside_the_clone() -> None:
    for deployment in _deployments():
        steps = deployment["pull"]
        (clone,) = [s["prefect.deployments.steps.git_clone"] for s in steps if "prefect.deployments.steps.git_clone" in s]
        (workdir,) = [
            s["prefect.deployments.steps.set_working_directory"]
            for s in steps
            if "prefect.deployments.steps.set_working_directory" in s
        ]
        assert clone["repository"]
        assert workdir["directory"] == "{{ " + clone["id"] + ".directory }}"


def test_entrypoints_exist_and_every_listed_schedule_is_active() -> None:
    for deployment in _deployments():
        path, flow_name = deployment["entrypoint"].split(":")
        assert f"def {flow_name}(" in (PROJECT_ROOT / path).read_text()
        for schedule in deployment.get("schedules") or []:
            assert schedule.get("active", True), f"{deployment['name']} lists an inactive schedule"
