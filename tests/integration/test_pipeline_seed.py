"""Same seed, same results: two pipeline runs in one project (one Memory-service data directory)
train the same models, because each run replays only its own collection, reproducibly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from agent.checkpoint import load_checkpoint_file
from tests.integration.memory_fixtures import free_port

pytestmark = pytest.mark.integration

STAGES = ["train_beginner", "train_intermediate"]
TIMING = {"steps_per_second", "wall_seconds"}


def _run(root: Path) -> dict[str, Any]:
    """One quick run of the first two training stages: each run starts its own service on the
    project's memory-data (a new port, as a later run on this machine would)."""
    from flows.pipeline import pipeline

    summary = pipeline(
        quick=True,
        root=str(root),
        stages=STAGES,
        overrides=[
            "pipeline.stage_timesteps=1500",
            f"memory.base_url=http://127.0.0.1:{free_port()}",
        ],
    )
    models = {
        level: load_checkpoint_file(root / "models" / f"{level}.pt")
        for level in ("beginner", "intermediate")
    }
    return {
        "metrics": {
            r["name"]: {k: v for k, v in r["metrics"].items() if k not in TIMING}
            for r in summary["stages"]
        },
        "curves": {level: (root / "plots" / f"train_{level}.csv").read_text() for level in models},
        "weights": {level: doc["agent"]["q_network"] for level, doc in models.items()},
        "collections": {
            level: doc["config"]["memory"]["collection"] for level, doc in models.items()
        },
    }


def test_two_pipeline_runs_with_one_seed_train_the_same_models(
    prefect_harness: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LAGENT_TRACKING", "0")  # MLflow is not what this test is about
    first, second = _run(tmp_path), _run(tmp_path)

    # A collection per training stage, as `dvc repro` runs it (each stage a run of its own), so the
    # Prefect path and the DVC path train the same models; the second run's collections are new.
    assert len(set(first["collections"].values())) == 2 == len(set(second["collections"].values()))
    assert not set(first["collections"].values()) & set(second["collections"].values())
    from memory.service import MemoryService
    from memory.settings import Settings

    service = MemoryService(Settings(data_dir=tmp_path / "memory-data"))
    try:
        sizes = {name: c.ring.size for name, c in service.collections.items()}
    finally:
        service.close()
    assert sizes[first["collections"]["beginner"]] == sizes[second["collections"]["beginner"]] > 0

    # Same rewards, same episodes, same weights (so the same losses on the way).
    assert first["metrics"] == second["metrics"]
    assert first["metrics"]["train_beginner"]["gradient_updates"] > 0
    assert first["curves"] == second["curves"]
    for level, weights in first["weights"].items():
        for key, value in weights.items():
            assert torch.equal(value, second["weights"][level][key]), (level, key)
