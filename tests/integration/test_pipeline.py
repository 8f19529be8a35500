"""The pipeline end to end, on real parts: `dvc repro` in a temporary git repo, the Prefect flow
under prefect_test_harness, the MLflow store they write, the exported ONNX model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from agent.config import PROJECT_ROOT
from flows.runner import STAGES
from flows.settings import LEVELS

pytestmark = [pytest.mark.integration, pytest.mark.slow]

_NOT_COPIED = {
    ".git", ".venv", "venv", "mlruns", "models", "metrics", "plots", "reports", "results", "runs",
    "memory-data", ".pytest_cache", ".hypothesis", "__pycache__", "dvc.lock", "benchmarks",
}


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("LAGENT_PARAMS", None)
    env.update(
        DVC_NO_ANALYTICS="1",
        DVC_SITE_CACHE_DIR=str(tmp / "dvc-site-cache"),
        MLFLOW_DISABLE_TELEMETRY="true",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com",
        GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.com",
    )
    return env


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def _merge(base: dict, layer: dict) -> dict:
    for key, value in layer.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def _ran(output: str) -> set[str]:
    return {stage for stage in STAGES if f"Running stage '{stage}'" in output}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git repository holding a copy of the project, its params.yaml set to the quick profile."""
    repo = tmp_path_factory.mktemp("project")
    for item in PROJECT_ROOT.iterdir():
        if item.name in _NOT_COPIED:
            continue
        target = repo / item.name
        if item.is_dir():
            shutil.copytree(item, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(item, target)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    quick = yaml.safe_load((repo / "configs" / "quick.yaml").read_text())
    (repo / "params.yaml").write_text(yaml.safe_dump(_merge(params, quick), sort_keys=False))
    env = _env(repo)
    _run(["git", "init", "-q"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-q", "-m", "project copy"], repo, env)
    return repo


def test_dvc_repro_runs_every_stage_then_only_what_changed(project: Path) -> None:
    env = _env(project)
    first = _run([sys.executable, "-m", "dvc", "repro"], project, env)
    assert _ran(first) == set(STAGES), first[-3000:]
    for level in LEVELS:
        assert (project / "models" / f"{level}.pt").stat().st_size > 0
        train = json.loads((project / "metrics" / f"train_{level}.json").read_text())
        assert train["train_steps"] >= 1
    evaluation = json.loads((project / "metrics" / "evaluate.json").read_text())
    assert set(evaluation) == set(LEVELS)
    assert all(0.0 <= row["success_rate"] <= 1.0 for row in evaluation.values())

    shown = _run([sys.executable, "-m", "dvc", "metrics", "show", "--json"], project, env)
    assert "evaluate.json" in shown

    second = _run([sys.executable, "-m", "dvc", "repro"], project, env)
    assert _ran(second) == set(), second[-2000:]

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["export"]["onnx_opset"] = params["export"]["onnx_opset"] - 1
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = _run([sys.executable, "-m", "dvc", "repro"], project, env)
    assert _ran(third) == {"export"}, third[-2000:]
    status = _run([sys.executable, "-m", "dvc", "status"], project, env)
    assert "changed" not in status

    # Every stage wrote its MLflow run into the project's store, and export registered the model.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("lagent")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    stage_runs = {r.data.tags.get("lagent.stage") for r in runs if r.data.tags.get("lagent.stage")}
    assert stage_runs == set(STAGES)
    # The run names the checkpoint by the hash DVC recorded for it, so `dvc pull` finds that file.
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    locked = {o["path"]: o["md5"] for o in lock["stages"]["train_expert"]["outs"]}
    expert_run = next(r for r in runs if r.data.tags.get("lagent.stage") == "train_expert")
    assert expert_run.data.tags["dvc.md5"] == locked["models/expert.pt"]
    versions = client.search_model_versions("name='lagent-navigation-policy'")
    assert len(versions) == 2  # the opset change exported and registered again


def test_exported_onnx_matches_torch(project: Path) -> None:
    import onnxruntime

    from agent.network import LearningNetwork, NetworkArchitecture

    export = project / "models" / "export"
    if not (export / "policy.onnx").exists():
        pytest.skip("needs the dvc repro test's outputs")
    saved = torch.load(export / "policy_state.pt", weights_only=True)
    network = LearningNetwork.from_architecture(NetworkArchitecture.from_dict(saved["architecture"]))
    network.load_state_dict(saved["state_dict"])
    network.eval()
    states = np.random.default_rng(0).normal(size=(37, network.input_size)).astype(np.float32)
    session = onnxruntime.InferenceSession(str(export / "policy.onnx"), providers=["CPUExecutionProvider"])
    (onnx_q,) = session.run(None, {"state": states})
    with torch.no_grad():
        torch_q = network(torch.from_numpy(states)).numpy()
    np.testing.assert_allclose(onnx_q, torch_q, atol=1e-4)
    assert (export / "model_card.md").read_text().count("|") > 10  # the metrics table is filled in


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_prefect_flow_tracks_parent_and_child_runs(prefect_harness, tmp_path: Path, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    from flows.pipeline import pipeline

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    summary = pipeline(quick=True, root=str(tmp_path), overrides=["pipeline.experiment=harness"])
    assert [r["name"] for r in summary["stages"]] == list(STAGES)
    assert (tmp_path / "models" / "export" / "policy.onnx").exists()

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("harness")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parent = [r for r in runs if r.info.run_id == summary["mlflow_parent_run_id"]]
    assert parent and parent[0].info.status == "FINISHED"
    assert parent[0].data.params["train.learning_rate"] == "0.001"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == summary["mlflow_parent_run_id"]]
    assert {r.data.tags["lagent.stage"] for r in children} == set(STAGES)
    train = next(r for r in children if r.data.tags["lagent.stage"] == "train_beginner")
    assert "train.learning_rate" in train.data.params
    assert "eval_mean_reward" in train.data.metrics
    assert len(client.get_metric_history(train.info.run_id, "rollout/reward_mean")) >= 1
    assert train.data.tags["dvc.md5"]
    search = next(r for r in children if r.data.tags["lagent.stage"] == "search_hyperparameters")
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == search.info.run_id]
    assert len(trials) >= 2 and all("value" in t.data.metrics or t.data.tags["optuna.state"] != "COMPLETE" for t in trials)
    versions = client.search_model_versions("name='lagent-navigation-policy'")
    assert versions and "beginner_success_rate" in versions[0].tags
