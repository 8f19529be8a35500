"""Independent stages run at the same time, and give what they give one after another."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

TINY = [
    "pipeline.stage_timesteps=1200",
    "pipeline.search_trials=2",
    "pipeline.search_timesteps=600",
    "pipeline.use_memory=false",
    "meta.eval_interval=300",
]
STAGES = ["train_beginner", "search_hyperparameters", "search_architecture"]


def _run(root: Path, parallel: int) -> tuple[dict[str, dict[str, float]], list[tuple[int, int]]]:
    from mlflow.tracking import MlflowClient

    from flows.pipeline import pipeline

    summary = pipeline(
        quick=True, root=str(root), stages=STAGES, overrides=[*TINY, f"pipeline.max_parallel_stages={parallel}"]
    )
    metrics = {r["name"]: r["metrics"] for r in summary["stages"]}
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("lagent")
    runs = client.search_runs([experiment.experiment_id], "tags.`lagent.stage` != ''")
    spans = [(r.info.start_time, r.info.end_time) for r in runs if r.data.tags.get("lagent.stage") in STAGES]
    return metrics, spans


def _overlap(spans: list[tuple[int, int]]) -> bool:
    return any(a[0] < b[1] and b[0] < a[1] for i, a in enumerate(spans) for b in spans[i + 1 :])


def test_parallel_stages_overlap_and_match_a_serial_run(prefect_harness, tmp_path: Path) -> None:
    serial, serial_spans = _run(tmp_path / "serial", parallel=1)
    parallel, parallel_spans = _run(tmp_path / "parallel", parallel=3)
    assert not _overlap(serial_spans)
    assert _overlap(parallel_spans)  # the searches ran beside training
    for stage in STAGES:
        varying = {"wall_seconds", "steps_per_second", "stage_seconds"}
        assert {k: v for k, v in parallel[stage].items() if k not in varying} == {
            k: v for k, v in serial[stage].items() if k not in varying
        }, stage
