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


Metrics = dict[str, dict[str, float]]
Spans = list[tuple[int, int]]
VARYING = {"wall_seconds", "steps_per_second", "stage_seconds"}


def _run(root: Path, parallel: int, *extra: str) -> tuple[Metrics, Spans]:
    from mlflow.tracking import MlflowClient

    from flows.pipeline import pipeline_flow

    overrides = [*TINY, f"pipeline.max_parallel_stages={parallel}", *extra]
    summary = pipeline_flow([], overrides, True)(quick=True, root=str(root), stages=STAGES, overrides=overrides)
    metrics = {r["name"]: r["metrics"] for r in summary["stages"]}
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("lagent")
    runs = client.search_runs([experiment.experiment_id], "tags.`lagent.stage` != ''")
    spans = [(r.info.start_time, r.info.end_time) for r in runs if r.data.tags.get("lagent.stage") in STAGES]
    return metrics, spans


def _overlap(spans: list[tuple[int, int]]) -> bool:
    return any(a[0] < b[1] and b[0] < a[1] for i, a in enumerate(spans) for b in spans[i + 1 :])


@pytest.fixture(scope="module")
def serial(prefect_harness, tmp_path_factory: pytest.TempPathFactory) -> tuple[Metrics, Spans]:
    """The stages one after another in this process: what every other way must reproduce."""
    return _run(tmp_path_factory.mktemp("serial"), parallel=1)


def _same_results(metrics: Metrics, reference: Metrics) -> None:
    for stage in STAGES:
        assert {k: v for k, v in metrics[stage].items() if k not in VARYING} == {
            k: v for k, v in reference[stage].items() if k not in VARYING
        }, stage


def test_parallel_stages_overlap_and_match_a_serial_run(serial: tuple[Metrics, Spans], tmp_path: Path) -> None:
    parallel, parallel_spans = _run(tmp_path / "parallel", parallel=3)
    assert not _overlap(serial[1])
    assert _overlap(parallel_spans)  # the searches ran beside training
    _same_results(parallel, serial[0])
