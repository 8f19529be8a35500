"""MLflow at the edge: where runs go, a batched metrics sink, and what a stage leaves behind.

Defaults to a SQLite store ``mlruns/mlflow.db`` with artifacts in ``mlruns/artifacts`` (MLflow 3
refuses a plain file store, and a database beside its artifact root avoids "malformed experiment"
errors); ``MLFLOW_TRACKING_URI`` points elsewhere (a tracking server, PostgreSQL).
Metrics are sent with ``log_batch``: one ``log_metric`` call per point costs ~18 ms on SQLite.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

_BATCH = 1000  # MLflow's log_batch limit for metrics
_PARAM_BATCH = 100  # ... and for params
_PIP_REQUIREMENTS = ["torch==2.13.0", "numpy==2.4.6"]


_uri_we_set: str | None = None  # mlflow.set_tracking_uri exports it as MLFLOW_TRACKING_URI


def _user_tracking_uri() -> str | None:
    """MLFLOW_TRACKING_URI as the user set it, not as our own earlier ``set_tracking_uri`` left it.

    MLflow copies every ``set_tracking_uri`` into the environment (for subprocesses), so without
    this a second pipeline in the same process (another root, a test) would write to the first's store.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or None
    return None if uri == _uri_we_set else uri


def setup_tracking(root: Path, experiment: str) -> str:
    """Point MLflow at the project's store (unless MLFLOW_TRACKING_URI says otherwise); return the experiment id."""
    global _uri_we_set
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    store = root / "mlruns"
    user_uri = _user_tracking_uri()
    if user_uri is None:
        store.mkdir(parents=True, exist_ok=True)
        _uri_we_set = f"sqlite:///{(store / 'mlflow.db').resolve()}"
        mlflow.set_tracking_uri(_uri_we_set)
    else:
        mlflow.set_tracking_uri(user_uri)
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        artifacts = (store / "artifacts").resolve().as_uri() if user_uri is None else None
        try:
            client.create_experiment(
                experiment, artifact_location=artifacts, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND}
            )
        except mlflow.exceptions.MlflowException:  # created meanwhile by another stage process
            pass
        found = client.get_experiment_by_name(experiment)
    if EXPERIMENT_KIND_TAG not in found.tags:  # an experiment from before this tag was set
        client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    return found.experiment_id


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
"""MLflow 3 opens an experiment without this tag in its GenAI view; ours trains models."""


@functools.lru_cache(maxsize=1)
def source_tags() -> dict[str, str]:
    """The tags MLflow sets on a run it starts itself (user, source, git), for runs we create
    through the client: without them the UI shows "Source -" and "Created by -".

    The git tags describe the code that runs (this package's checkout), not the working directory.
    """
    from mlflow.tracking.context.registry import resolve_tags
    from mlflow.utils import git_utils
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_BRANCH, MLFLOW_GIT_COMMIT, MLFLOW_GIT_DIRTY, MLFLOW_GIT_REPO_URL

    from agent.config import PROJECT_ROOT

    tags = {k: str(v) for k, v in resolve_tags().items()}
    code = str(PROJECT_ROOT)
    for key, value in (
        (MLFLOW_GIT_COMMIT, git_utils.get_git_commit(code)),
        (MLFLOW_GIT_BRANCH, git_utils.get_git_branch(code)),
        (MLFLOW_GIT_REPO_URL, git_utils.get_git_repo_url(code)),
    ):
        if value:
            tags[key] = value
        else:
            tags.pop(key, None)
    if tags.get(MLFLOW_GIT_COMMIT):
        tags[MLFLOW_GIT_DIRTY] = str(_git_dirty(code)).lower()
    return tags


def _git_dirty(path: str) -> bool:
    """Uncommitted changes in the code's checkout: the commit alone does not name that code."""
    try:
        import git

        return git.Repo(path, search_parent_directories=True).is_dirty(untracked_files=False)
    except Exception:  # noqa: BLE001 - no git, or not a checkout: nothing to say
        return False


def tracking_uri() -> str:
    return mlflow.get_tracking_uri()


class MlflowSink:
    """A MetricsSink that buffers points and writes them with ``log_batch``."""

    def __init__(self, run_id: str, flush_every: int = _BATCH) -> None:
        self.run_id = run_id
        self.flush_every = flush_every
        self._client = MlflowClient()
        self._pending: list[Metric] = []

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        for name, value in metrics.items():
            value = float(value)
            if math.isfinite(value):  # NaN/inf are "no value yet" here, not a point to plot
                self._pending.append(Metric(key=name, value=value, timestamp=now, step=int(step)))
        if len(self._pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        while self._pending:
            chunk, self._pending = self._pending[:_BATCH], self._pending[_BATCH:]
            self._client.log_batch(self.run_id, metrics=chunk, synchronous=True)

    def close(self) -> None:
        self.flush()


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"gamma": 0.99}}`` -> ``{"train.gamma": 0.99}`` (lists stay values)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def select_params(raw: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    """The flattened values of dotted ``keys`` (a section name selects the whole section)."""
    flat = flatten(raw)
    chosen: dict[str, Any] = {}
    for key in keys:
        chosen.update({k: v for k, v in flat.items() if k == key or k.startswith(key + ".")})
    return chosen


def log_params(run_id: str, params: Mapping[str, Any]) -> None:
    client = MlflowClient()
    items = [Param(key, str(value)[:6000]) for key, value in params.items()]
    for start in range(0, len(items), _PARAM_BATCH):
        client.log_batch(run_id, params=items[start : start + _PARAM_BATCH], synchronous=True)


def log_metrics(run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    sink = MlflowSink(run_id)
    sink.log_metrics(metrics, step)
    sink.close()


def file_md5(path: Path) -> str:
    """The hash DVC records for a file out, so a run names the exact checkpoint `dvc pull` brings back."""
    digest = hashlib.md5()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def start_child_run(
    experiment_id: str, parent_run_id: str | None, name: str, tags: Mapping[str, str] | None = None
) -> str:
    """A run under ``parent_run_id`` created through the client: safe from worker threads."""
    all_tags = {**source_tags(), **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = MlflowClient().create_run(experiment_id, tags=all_tags, run_name=name)
    return run.info.run_id


def end_run(run_id: str, failed: bool = False) -> None:
    MlflowClient().set_terminated(run_id, status="FAILED" if failed else "FINISHED")


def set_tags(run_id: str, tags: Mapping[str, str]) -> None:
    MlflowClient().log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()], synchronous=True)


def log_artifacts(run_id: str, paths: Iterable[Path], artifact_path: str | None = None) -> None:
    client = MlflowClient()
    for path in paths:
        if path.is_file():
            client.log_artifact(run_id, str(path), artifact_path)
        elif path.is_dir():
            client.log_artifacts(run_id, str(path), artifact_path)


def log_and_register_model(
    run_id: str,
    network: Any,
    input_example: Any,
    registered_model_name: str,
    metrics: Mapping[str, float],
    description: str,
) -> tuple[str, str]:
    """Log the policy with ``mlflow.pytorch`` and register it; return (model uri, version)."""
    import mlflow.pytorch

    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            network,
            name="policy",
            input_example=input_example,
            pip_requirements=_PIP_REQUIREMENTS,
            registered_model_name=registered_model_name,
            await_registration_for=60,
        )
        if metrics:
            mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, model_id=info.model_id)
    client = MlflowClient()
    version = str(info.registered_model_version)
    client.update_model_version(registered_model_name, version, description=description)
    for key, value in metrics.items():
        client.set_model_version_tag(registered_model_name, version, key, f"{float(value):.6g}")
    return info.model_uri, version


CHAMPION_ALIAS = "champion"
SCORE_TAG = "lagent.score"


def promote_if_better(name: str, version: str, score: float | None, metric: str) -> str:
    """Give ``version`` the ``champion`` alias only if its ``score`` beats the current holder's.

    Returns the line the pipeline's summary prints. A version without a score never takes the alias
    from one that has one; the first scored version takes it when nobody holds it.
    """
    client = MlflowClient()
    if score is None or not math.isfinite(score):
        return f"v{version} has no {metric}: alias '{CHAMPION_ALIAS}' unchanged"
    client.set_model_version_tag(name, version, SCORE_TAG, f"{score:.6g}")
    try:
        holder = client.get_model_version_by_alias(name, CHAMPION_ALIAS)
    except mlflow.exceptions.MlflowException:  # nobody holds it yet
        holder = None
    if holder is not None and str(holder.version) != str(version):
        held = holder.tags.get(SCORE_TAG)
        if held is not None and float(held) >= score:
            return f"v{holder.version} stays '{CHAMPION_ALIAS}' ({metric} {float(held):.3g} >= v{version}'s {score:.3g})"
        client.set_registered_model_alias(name, CHAMPION_ALIAS, version)
        return f"v{version} is the new '{CHAMPION_ALIAS}' ({metric} {score:.3g} > v{holder.version}'s {held or 'none'})"
    client.set_registered_model_alias(name, CHAMPION_ALIAS, version)
    return f"v{version} is '{CHAMPION_ALIAS}' ({metric} {score:.3g}; no earlier holder)"


def finish_pipeline_run(
    run_id: str, results: list[Mapping[str, Any]], seconds: float, root: Path, dvc_line: str
) -> None:
    """The parent run's own record: every stage's figures (``stage.metric``), the summary, the
    evaluation report and the model card, so one run page tells how the pipeline went."""
    metrics: dict[str, float] = {"pipeline_seconds": seconds}
    for result in results:
        for key, value in (result.get("metrics") or {}).items():
            metrics[f"{result['name']}.{key}"] = float(value)
        if "seconds" in result:
            metrics[f"{result['name']}.seconds"] = float(result["seconds"])
    log_metrics(run_id, metrics)
    summary = {r["name"]: r["summary"] for r in results}
    MlflowClient().log_text(run_id, json.dumps({"stages": summary, "seconds": seconds, "dvc": dvc_line}, indent=2),
                            "pipeline_summary.json")
    set_tags(run_id, {"lagent.dvc": dvc_line[:5000]})
    log_artifacts(run_id, [root / "reports" / "evaluation.md", root / "models" / "export" / "model_card.md"])
    end_run(run_id)


def runs_of(experiment: str) -> Iterator[Any]:
    """Every run of an experiment (for summaries and tests)."""
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return iter(())
    return iter(client.search_runs([found.experiment_id], max_results=5000))
