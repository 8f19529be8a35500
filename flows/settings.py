"""The pipeline's own params.yaml sections (``pipeline``, ``export``) and where stages write.

Output paths are fixed, relative to the project root, because ``dvc.yaml`` names them as outs,
metrics and plots: the Prefect flow and ``dvc repro`` run the same stage functions and write the
same files, so a run done either way can be inspected with ``dvc metrics show``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from agent.config import Config, Section, load_config, load_raw, load_section, register_section

LEVELS: tuple[str, ...] = ("beginner", "intermediate", "advanced", "expert")
"""The curriculum levels, in training order: one training stage each."""


class PipelineConfig(Section):
    task: str = Field(min_length=1)
    """The task type trained through the curriculum levels."""
    stage_timesteps: int = Field(ge=1)
    """Environment steps per curriculum level; each level starts from the previous level's model."""
    finetune_epsilon_start: float = Field(ge=0.0, le=1.0)
    """Exploration at the start of every level after the first (the model already acts sensibly)."""
    search_trials: int = Field(ge=1)
    """Trials of each pipeline search (``meta.n_trials`` is for ``lagent optimize``)."""
    search_timesteps: int = Field(ge=1)
    """Steps per pipeline search trial (``meta.trial_timesteps`` is for ``lagent optimize``)."""
    adapt_timesteps: int = Field(ge=1)
    """Fine-tuning budget of the adaptation stage, and of its from-scratch baseline."""
    adapt_task: str = Field(min_length=1)
    """The second task the final policy is adapted to (policy-adaptation stage)."""
    use_memory: bool
    """Train through the Memory service (started on loopback when none answers at memory.base_url)."""
    experiment: str = Field(min_length=1)
    """MLflow experiment that holds the pipeline's runs."""
    max_parallel_stages: int = Field(ge=1, le=8)
    """Independent stages run at the same time, at most this many (1: one after another)."""
    task_runner: Literal["local", "ray"] = "local"
    """Where stages run: threads of the flow's process, or Ray tasks (prefect-ray's RayTaskRunner),
    the searches' trials then Ray tasks too, sharing their study."""
    ray_address: str | None = None
    """With task_runner ray: the cluster to join ('auto', 'ray://HOST:PORT'); null: a local
    instance for the run."""
    search_storage: str | None = None
    """Where the searches' Optuna studies live: null, a fresh SQLite file in each search's output
    directory (one machine); an RDB URL (postgresql://...) that trials on other machines reach,
    with a new study per stage run."""


class ExportConfig(Section):
    registered_model_name: str = Field(min_length=1)
    """Name of the model in the MLflow model registry."""
    input_example_batch: int = Field(ge=2)
    """Rows of the logged input example: a batch of 1 would freeze the exported batch size."""
    onnx_opset: int = Field(ge=13)
    """ONNX opset of the exported policy."""
    onnx_tolerance: float = Field(gt=0.0)
    """Largest allowed |onnxruntime - torch| on the check batch."""


register_section("pipeline", PipelineConfig)
register_section("export", ExportConfig)


@dataclass(frozen=True)
class Settings:
    """Everything a stage reads, loaded once from the layered params."""

    config: Config
    pipeline: PipelineConfig
    export: ExportConfig
    raw: dict[str, Any]


def load_settings(
    params_files: Iterable[str | Path] = (), overrides: Iterable[str | Mapping[str, Any]] = ()
) -> Settings:
    params_files, overrides = list(params_files), list(overrides)
    raw = load_raw(params_files, overrides)
    pipeline = load_section("pipeline", PipelineConfig, raw)
    config = load_config(params_files, [*overrides, {"train": {"task": pipeline.task}}])
    return Settings(
        config=config,
        pipeline=pipeline,  # type: ignore[arg-type]
        export=load_section("export", ExportConfig, raw),  # type: ignore[arg-type]
        raw=raw,
    )


@dataclass(frozen=True)
class Layout:
    """Where every stage writes, under one root (the project directory)."""

    root: Path

    def model(self, level: str) -> Path:
        return self.root / "models" / f"{level}.pt"

    @property
    def final_model(self) -> Path:
        return self.model(LEVELS[-1])

    @property
    def adapted_model(self) -> Path:
        return self.root / "models" / "adapted.pt"

    @property
    def export_dir(self) -> Path:
        return self.root / "models" / "export"

    def metrics(self, stage: str) -> Path:
        return self.root / "metrics" / f"{stage}.json"

    def curve(self, level: str) -> Path:
        return self.root / "plots" / f"train_{level}.csv"

    @property
    def learning_curve_png(self) -> Path:
        return self.root / "plots" / "learning_curve.png"

    @property
    def evaluation_report(self) -> Path:
        return self.root / "reports" / "evaluation.md"

    def search_dir(self, kind: str) -> Path:
        return self.root / "results" / f"search_{kind}"

    @property
    def memory_data(self) -> Path:
        return self.root / "memory-data"
