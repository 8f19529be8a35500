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


def _dvc(project: Path, *args: str) -> str:
    return _run([sys.executable, "-m", "dvc", *args], project, _env(project))


def test_prefect_run_is_dvcs_state_then_dvc_reruns_only_what_changed(prefect_harness, project: Path) -> None:
    """The main job's path (the Prefect flow) leaves the state `dvc repro` would have left: a clean
    `dvc status`, a `dvc repro` with nothing to do, metrics to show; a param change then reruns
    only the stage that reads it, through `dvc repro`, into the same MLflow store."""
    from flows.pipeline import pipeline

    summary = pipeline(params_files=[str(project / "params.yaml")], root=str(project))
    assert [r["name"] for r in summary["stages"]] == list(STAGES)
    assert summary["dvc"]["committed"] == list(STAGES), summary["dvc"]
    for level in LEVELS:
        assert (project / "models" / f"{level}.pt").stat().st_size > 0
        assert json.loads((project / "metrics" / f"train_{level}.json").read_text())["train_steps"] >= 1
    evaluation = json.loads((project / "metrics" / "evaluate.json").read_text())
    assert set(evaluation) == set(LEVELS)
    assert all(0.0 <= row["success_rate"] <= 1.0 for row in evaluation.values())

    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)
    assert "up to date" in _dvc(project, "status")
    assert _ran(_dvc(project, "repro")) == set()
    assert "evaluate.json" in _dvc(project, "metrics", "show", "--json")

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["export"]["onnx_opset"] = params["export"]["onnx_opset"] - 1
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _ran(_dvc(project, "repro")) == {"export"}
    assert "changed" not in _dvc(project, "status")

    # Every stage wrote its MLflow run into the project's store: the flow's under one parent run.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("lagent")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parent = next(r for r in runs if r.info.run_id == summary["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["train.learning_rate"] == str(params["train"]["learning_rate"])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert {r.data.tags["lagent.stage"] for r in children} == set(STAGES)
    train = next(r for r in children if r.data.tags["lagent.stage"] == "train_beginner")
    assert "train.learning_rate" in train.data.params
    assert "eval_mean_reward" in train.data.metrics
    assert len(client.get_metric_history(train.info.run_id, "rollout/reward_mean")) >= 1
    # The spec's monitoring list reaches MLflow too: system figures, throughput, per-layer gradients.
    assert {"system/rss_mb", "system/cpu_percent", "time/updates_per_second", "grad_norm/head",
            "memory/latency_p50_ms", "memory/latency_p99_ms"} <= set(train.data.metrics)
    assert train.data.metrics["system/rss_mb"] > 0
    search = next(r for r in children if r.data.tags["lagent.stage"] == "search_hyperparameters")
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == search.info.run_id]
    assert len(trials) >= 2 and all("value" in t.data.metrics or t.data.tags["optuna.state"] != "COMPLETE" for t in trials)

    # The parent run carries the pipeline's figures, its summary, report and model card.
    assert parent.data.metrics["train_expert.eval_success_rate"] == pytest.approx(
        json.loads((project / "metrics" / "train_expert.json").read_text())["eval_success_rate"]
    )
    assert "pipeline_seconds" in parent.data.metrics
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"evaluation.md", "model_card.md", "pipeline_summary.json"} <= artifacts

    # Which code made each run: the tags MLflow sets on runs it starts itself.
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True)
    for run in (parent, train, trials[0]):
        tags = run.data.tags
        assert tags["mlflow.user"] and tags["mlflow.source.name"] and tags["mlflow.source.type"] == "LOCAL"
        if head.returncode == 0:
            assert tags["mlflow.source.git.commit"] == head.stdout.strip()
    export_by_dvc = next(
        r for r in runs if r.data.tags.get("lagent.stage") == "export" and r.info.run_id not in {c.info.run_id for c in children}
    )
    project_head = _run(["git", "rev-parse", "HEAD"], project, _env(project)).strip()
    assert export_by_dvc.data.tags["mlflow.source.git.commit"] == project_head

    # The run names the checkpoint by the hash DVC recorded for it, so `dvc pull` finds that file.
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    locked = {o["path"]: o["md5"] for o in lock["stages"]["train_expert"]["outs"]}
    expert_run = next(r for r in children if r.data.tags.get("lagent.stage") == "train_expert")
    assert expert_run.data.tags["dvc.md5"] == locked["models/expert.pt"]

    # Two exports of the same policy: the second is registered but does not take `champion`.
    versions = client.search_model_versions("name='lagent-navigation-policy'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert all("expert_success_rate" in v.tags and "lagent.score" in v.tags for v in versions)
    assert str(client.get_model_version_by_alias("lagent-navigation-policy", "champion").version) == "1"
    assert "v1 stays 'champion'" in export_by_dvc.data.tags["lagent.summary"]


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




def _stable(metrics: dict) -> dict:
    """A stage's metrics without the figures that depend on the machine's speed."""
    return {k: v for k, v in metrics.items() if "seconds" not in k and "per_second" not in k}


def test_the_quick_profile_on_ray_gives_the_local_runs_outputs(
    prefect_harness, ray_instance: str, project: Path, tmp_path: Path
) -> None:
    """`pipeline.task_runner: ray`: every stage a Ray task (prefect-ray), the searches' trials Ray
    tasks too; the same files and the same figures as the flow in threads above (one seed)."""
    import optuna

    from flows.pipeline import pipeline, pipeline_flow

    params = [str(project / "params.yaml")]
    if not (project / "metrics" / "train_beginner.json").exists():  # this test run alone
        pipeline(params_files=params, root=str(project))
    overrides = ["pipeline.task_runner=ray"]
    summary = pipeline_flow(params, overrides)(params_files=params, overrides=overrides, root=str(tmp_path))
    assert [r["name"] for r in summary["stages"]] == list(STAGES)
    for folder in ("models", "metrics"):
        local = sorted(p.relative_to(project) for p in (project / folder).rglob("[!.]*") if p.is_file())
        on_ray = sorted(p.relative_to(tmp_path) for p in (tmp_path / folder).rglob("[!.]*") if p.is_file())
        assert on_ray == local, folder
    for path in sorted((project / "metrics").glob("*.json")):
        if path.stem == "export":  # the test above re-exported with another ONNX opset
            continue
        local_metrics = _stable(json.loads(path.read_text()))
        assert _stable(json.loads((tmp_path / "metrics" / path.name).read_text())) == local_metrics, path.name
    study = optuna.load_study(
        study_name="pipeline_navigation/navigation@beginner/hyperparameters",
        storage=f"sqlite:///{tmp_path / 'results' / 'search_hyperparameters' / 'study.db'}",
    )
    workers = {trial.user_attrs.get("worker") for trial in study.trials}
    assert None not in workers and not any(w.endswith(f":{os.getpid()}") for w in workers)  # Ray tasks
