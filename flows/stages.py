"""The pipeline's stages, one plain function each.

Every stage reads its settings, writes its outputs to the fixed paths of :class:`Layout` and
returns a :class:`StageResult`. Nothing here talks to Prefect, MLflow or DVC: ``dvc repro`` runs a
stage through ``python -m flows stage NAME``, the Prefect flow calls the same function as a task,
and the tracking layer (``flows/tracking.py``) records what the result names.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import platform
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from agent import LearningAgent, TrainingManager
from agent.checkpoint import load_checkpoint_file
from agent.config import Config, with_run_collection
from agent.jsonable import jsonable
from agent.metrics import MetricsSink
from agent.network import LearningNetwork, NetworkArchitecture
from agent.tasks import CurriculumManager, task_spaces
from flows.formatting import percent
from flows.settings import LEVELS, Layout, Settings

Progress = Callable[[Mapping[str, float]], None]


@dataclass
class StageResult:
    """What a stage produced: figures for tracking, files for artifacts, a line for the summary."""

    name: str
    metrics: dict[str, float]
    outputs: list[Path]
    summary: str
    model: Path | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "metrics": self.metrics,
            "outputs": [str(p) for p in self.outputs],
            "summary": self.summary,
            "model": str(self.model) if self.model else None,
        }


def write_json(path: Path, payload: Mapping[str, Any]) -> Path:
    """``payload`` as sorted, indented JSON (numpy numbers and paths as plain values)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(payload), indent=2, sort_keys=True) + "\n")
    return path


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


@contextlib.contextmanager
def memory_client_for(settings: Settings, layout: Layout, config: Config | None = None) -> Iterator[Any]:
    """A MemoryClient when the pipeline replays through the service (started if none answers).

    Writes queued while the service is away wait in ``runs/pipeline/memory-outbox`` and are
    delivered by the next stage that reaches the service. ``config`` (default: the settings')
    names the collection.
    """
    from flows.memory_service import memory_session

    with memory_session(
        config or settings.config,
        run_dir=layout.root / "runs" / "pipeline",
        enabled=settings.pipeline.use_memory,
        data_dir=layout.memory_data,
    ) as client:
        yield client


# --------------------------------------------------------------------------- training


def level_training_config(settings: Settings, level: str) -> dict[str, Any]:
    """The ``train`` keys a curriculum-level stage changes: its budget and, after the first, exploration."""
    overrides: dict[str, Any] = {"total_timesteps": settings.pipeline.stage_timesteps, "max_episodes": None}
    if LEVELS.index(level) > 0:
        overrides["epsilon_start"] = settings.pipeline.finetune_epsilon_start
    return overrides


def train_level(
    settings: Settings,
    layout: Layout,
    level: str,
    *,
    metrics_sink: MetricsSink | None = None,
    progress: Progress | None = None,
) -> StageResult:
    """Train one curriculum level, starting from the previous level's model."""
    if level not in LEVELS:
        raise ValueError(f"unknown curriculum level '{level}'; expected one of {', '.join(LEVELS)}")
    config, task = settings.config, settings.pipeline.task
    if settings.pipeline.use_memory:  # saved with the model: which collection it replayed
        config = with_run_collection(config, f"{task}-{level}")
    task_params = CurriculumManager.for_task(task, config=config).parameters_for(level)
    input_dim, output_dim = task_spaces(task, config=config)
    agent = LearningAgent(input_dim, output_dim, config=config)
    previous = layout.model(LEVELS[LEVELS.index(level) - 1]) if LEVELS.index(level) > 0 else None
    if previous is not None:
        agent.load_state_dict(load_checkpoint_file(previous)["agent"])

    with memory_client_for(settings, layout, config) as memory_client:
        trainer = TrainingManager(
            agent,
            memory_client,
            task_type=task,
            training_config=level_training_config(settings, level),
            task_params=task_params,
            metrics_sink=metrics_sink,
            tensorboard=False,
        )
        try:
            summary = trainer.run(progress=progress)
            trainer.run_evaluation(num_episodes=config.evaluate.episodes)
            evaluation = trainer.last_evaluation
            model = trainer.save_checkpoint(layout.model(level), include_run_state=False)
            trainer.write_episode_log(layout.curve(level))
        finally:
            trainer.close()

    metrics = {
        "eval_success_rate": _finite(evaluation.get("success_rate")),
        "eval_mean_reward": _finite(evaluation["mean_reward"]),
        "eval_std_reward": _finite(evaluation["std_reward"]),
        "train_steps": summary["global_step"],
        "train_episodes": summary["episodes"],
        "gradient_updates": summary["training_steps"],
        "recent_mean_reward": _finite(summary.get("recent_mean_reward")),
        "steps_per_second": _finite(summary.get("steps_per_second")),
        "wall_seconds": _finite(summary.get("wall_seconds")),
    }
    metrics_path = write_json(layout.metrics(f"train_{level}"), {k: v for k, v in metrics.items() if v is not None})
    started = "from scratch" if previous is None else f"from {previous.name}"
    return StageResult(
        name=f"train_{level}",
        metrics={k: float(v) for k, v in metrics.items() if v is not None},
        outputs=[model, metrics_path, layout.curve(level)],
        summary=(
            f"{level}: {summary['global_step']:,} steps {started}, greedy success "
            f"{percent(evaluation.get('success_rate'), 'n/a')}, reward {evaluation['mean_reward']:.2f}"
        ),
        model=model,
    )


# --------------------------------------------------------------------------- evaluation


def evaluate(settings: Settings, layout: Layout) -> StageResult:
    """The final model at every curriculum level: success rate and reward per level."""
    trainer = TrainingManager.from_checkpoint(
        layout.final_model,
        overrides={"evaluate": settings.config.evaluate.model_dump()},
        tensorboard=False,
    )
    try:
        report = trainer.run_curriculum_evaluation(settings.config.evaluate.episodes)
    finally:
        trainer.close()
    payload = {
        level: {
            "success_rate": _finite(row["success_rate"]),
            "mean_reward": _finite(row["mean_reward"]),
            "std_reward": _finite(row["std_reward"]),
        }
        for level, row in report.items()
    }
    metrics_path = write_json(layout.metrics("evaluate"), payload)
    report_path = _write_evaluation_report(layout, settings, payload)
    curve_path = plot_learning_curves(layout)
    metrics = {
        f"{level}_{key}": value for level, row in payload.items() for key, value in row.items() if value is not None
    }
    line = ", ".join(f"{level} {percent(row['success_rate'], 'n/a')}" for level, row in payload.items())
    return StageResult(
        name="evaluate",
        metrics=metrics,
        outputs=[metrics_path, report_path, curve_path],
        summary=f"success per level: {line}",
    )


def _write_evaluation_report(layout: Layout, settings: Settings, payload: Mapping[str, Any]) -> Path:
    lines = [
        f"# Evaluation of {layout.final_model.name} on {settings.pipeline.task}",
        "",
        f"{settings.config.evaluate.episodes} episodes per level, epsilon {settings.config.evaluate.epsilon}.",
        "",
        "| level | success rate | mean reward | std |",
        "|---|---|---|---|",
    ]
    for level, row in payload.items():
        lines.append(
            f"| {level} | {percent(row['success_rate'], 'n/a')} | {row['mean_reward']:.2f} | {row['std_reward']:.2f} |"
        )
    path = layout.evaluation_report
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def read_curve(path: Path) -> tuple[list[int], list[float]]:
    episodes, rewards = [], []
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            episodes.append(int(row["episode"]))
            rewards.append(float(row["reward"]))
    return episodes, rewards


def plot_learning_curves(layout: Layout) -> Path:
    """One PNG: episode reward across the curriculum levels, smoothed, levels in sequence."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9, 4.5))
    offset = 0
    for level in LEVELS:
        path = layout.curve(level)
        if not path.exists():
            continue
        episodes, rewards = read_curve(path)
        if not rewards:
            continue
        window = max(1, min(100, len(rewards) // 10))
        smoothed = np.convolve(rewards, np.ones(window) / window, mode="valid")
        x = np.arange(len(smoothed)) + offset + window
        axis.plot(offset + np.asarray(episodes), rewards, alpha=0.15, linewidth=0.6)
        axis.plot(x, smoothed, label=level, linewidth=1.6)
        offset += len(rewards)
        axis.axvline(offset, color="grey", linewidth=0.5, linestyle=":")
    axis.set_xlabel("episode (all levels in sequence)")
    axis.set_ylabel("episode reward")
    axis.set_title("Learning curve through the curriculum")
    axis.legend(loc="best")
    figure.tight_layout()
    path = layout.learning_curve_png
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


# --------------------------------------------------------------------------- export


def export_model(settings: Settings, layout: Layout) -> StageResult:
    """The final policy as ONNX (checked against torch) and a safe state dict, with a model card."""
    document = load_checkpoint_file(layout.final_model)
    architecture = NetworkArchitecture.from_dict(document["agent"]["architecture"])
    network = LearningNetwork.from_architecture(architecture)
    network.load_state_dict(document["agent"]["q_network"])
    network.eval()

    out = layout.export_dir
    out.mkdir(parents=True, exist_ok=True)
    weights_path = out / "policy_state.pt"
    torch.save({"architecture": architecture.to_dict(), "state_dict": network.state_dict()}, weights_path)

    example = export_example(network, settings.export.input_example_batch, settings.config.run.seed)
    onnx_path = out / "policy.onnx"
    max_diff = export_onnx(network, example, onnx_path, settings.export.onnx_opset)
    if max_diff > settings.export.onnx_tolerance:
        raise RuntimeError(
            f"ONNX export differs from torch by {max_diff:.2e} (> export.onnx_tolerance "
            f"{settings.export.onnx_tolerance:.0e}); not exporting a model that acts differently"
        )

    evaluation = json.loads(layout.metrics("evaluate").read_text()) if layout.metrics("evaluate").exists() else {}
    card_path = _write_model_card(settings, layout, architecture, evaluation, document)
    metrics = {
        "onnx_max_abs_diff": max_diff,
        "parameters": float(sum(p.numel() for p in network.parameters())),
    }
    metrics_path = write_json(layout.metrics("export"), metrics)
    return StageResult(
        name="export",
        metrics=metrics,
        outputs=[onnx_path, weights_path, card_path, metrics_path],
        summary=f"ONNX and state dict in {out} (|onnx - torch| <= {max_diff:.1e})",
        model=layout.final_model,
        extras={"network": network, "input_example": example.numpy(), "evaluation": evaluation},
    )


def export_example(network: LearningNetwork, batch: int, seed: int) -> torch.Tensor:
    """States to check the export on (and the MLflow model's input example): standard normal, or
    for a network that normalises observations, drawn at the observations' own mean and spread,
    so that the check covers the standardisation the model applies and not only its clip."""
    generator = torch.Generator().manual_seed(seed)
    example = torch.randn(batch, network.input_size, generator=generator)
    normalization = network.normalization()
    if normalization is not None:
        shift, scale = normalization
        example = shift + example / scale
    return example


def export_onnx(network: torch.nn.Module, example: torch.Tensor, path: Path, opset: int) -> float:
    """Write ``network`` as ONNX with a dynamic batch axis; return the max |onnxruntime - torch|."""
    import logging

    import onnxruntime

    # The exporter warns once per torchvision op it cannot register; we use none of them.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        # torch.export's own deprecation notice (LeafSpec), raised inside the exporter, not by us.
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        torch.onnx.export(
            network,
            (example,),
            str(path),
            input_names=["state"],
            output_names=["q_values"],
            dynamic_shapes={"state": {0: batch}},
            opset_version=opset,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    check = torch.cat([example, example[:3] * 2.0])  # a different batch size than the example
    (onnx_out,) = session.run(None, {"state": check.numpy()})
    with torch.no_grad():
        torch_out = network(check).numpy()
    return float(np.max(np.abs(onnx_out - torch_out)))


def _write_model_card(
    settings: Settings,
    layout: Layout,
    architecture: NetworkArchitecture,
    evaluation: Mapping[str, Any],
    document: Mapping[str, Any],
) -> Path:
    config = document.get("config", {})
    train = config.get("train", {})
    rows = "\n".join(
        f"| {level} | {percent(row.get('success_rate'), 'n/a')} | {row.get('mean_reward', float('nan')):.2f} |"
        for level, row in evaluation.items()
    )
    normalization = (
        "\n  The model standardises raw observations itself (running mean and variance of those seen"
        "\n  in training, clipped to [-10, 10]) before its first layer."
        if architecture.normalize_obs
        else ""
    )
    card = f"""# Model card: {settings.export.registered_model_name}

A deep Q-network policy for the `{settings.pipeline.task}` task, trained through the four curriculum
levels ({', '.join(LEVELS)}), {settings.pipeline.stage_timesteps:,} environment steps each, each level
starting from the previous level's weights.

## Inputs and outputs
- Input `state`: float32 `[batch, {architecture.input_dim}]`, the task's observation vector.{normalization}
- Output `q_values`: float32 `[batch, {architecture.output_dim}]`; the action is the argmax, an index
  into the task's discretised action set (see `agent/tasks/spaces.py`).

## Network
{len(architecture.hidden_layers)} hidden layers {list(architecture.hidden_layers)}, activation
{architecture.activation}, dropout {architecture.dropout}, dueling {architecture.dueling}.

## Training
Double DQN with a target network, Huber loss, gradient clipping. Learning rate
{train.get('learning_rate')}, gamma {train.get('gamma')}, batch {train.get('batch_size')},
{train.get('num_envs')} environment copies, seed {config.get('run', {}).get('seed')}.
Training data: experience the agent generated in the simulated task itself (no external data).

## Evaluation ({settings.config.evaluate.episodes} episodes per level)
| level | success rate | mean reward |
|---|---|---|
{rows}

## Files
- `policy.onnx`: ONNX (opset {settings.export.onnx_opset}), dynamic batch axis, checked against
  PyTorch with onnxruntime.
- `policy_state.pt`: architecture and state dict; load with `torch.load(path, weights_only=True)` and
  `LearningNetwork.from_architecture(NetworkArchitecture.from_dict(...))`.

Built with torch {torch.__version__} on Python {platform.python_version()}. Limits: trained only in
simulation; success rates above are on the simulator's own seeds held out from training.
"""
    path = layout.export_dir / "model_card.md"
    path.write_text(card)
    return path


def write_params_file(path: Path, params: Mapping[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(dict(params), sort_keys=False))
    return path
