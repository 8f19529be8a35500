"""The orchestration edge without the heavy parts: settings, dvc.yaml consistency, MLflow sink, CLI errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from agent.config import PROJECT_ROOT, ConfigError, load_raw
from flows import tracking
from flows.cli import main
from flows.runner import STAGES, dvc_stage_params
from flows.settings import LEVELS, Layout, load_settings


def test_settings_read_the_pipeline_sections_and_apply_the_task() -> None:
    settings = load_settings(overrides=["pipeline.stage_timesteps=1234", "pipeline.task=exploration"])
    assert settings.pipeline.stage_timesteps == 1234
    assert settings.config.train.task == "exploration"
    with pytest.raises(ConfigError, match="stage_timesteps"):
        load_settings(overrides=["pipeline.stage_timesteps=0"])
    with pytest.raises(ConfigError, match="unknown key 'pipeline.stage_timestep'"):
        load_settings(overrides=["pipeline.stage_timestep=10"])


def test_dvc_yaml_names_every_stage_and_only_params_that_exist() -> None:
    document = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())
    assert list(document["stages"]) == list(STAGES)
    flat = tracking.flatten(load_raw())
    for stage in STAGES:
        keys = dvc_stage_params(stage)
        assert keys, stage
        for key in keys:
            assert any(k == key or k.startswith(key + ".") for k in flat), f"{stage}: params.yaml has no '{key}'"
        assert document["stages"][stage]["cmd"] == f"python -m flows stage {stage}"


def test_layout_paths_match_dvc_outs() -> None:
    document = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())
    layout = Layout(PROJECT_ROOT)

    def declared(stage: str, kind: str) -> set[str]:
        return {next(iter(e)) if isinstance(e, dict) else e for e in document["stages"][stage].get(kind, [])}

    for level in LEVELS:
        assert str(layout.model(level).relative_to(PROJECT_ROOT)) in declared(f"train_{level}", "outs")
        assert str(layout.metrics(f"train_{level}").relative_to(PROJECT_ROOT)) in declared(f"train_{level}", "metrics")
        assert str(layout.curve(level).relative_to(PROJECT_ROOT)) in declared(f"train_{level}", "plots")
    assert str(layout.export_dir.relative_to(PROJECT_ROOT)) in declared("export", "outs")


def test_select_params_takes_sections_and_dotted_keys() -> None:
    raw = {"train": {"gamma": 0.9, "lr": 1e-3}, "pipeline": {"task": "navigation", "use_memory": True}}
    chosen = tracking.select_params(raw, ["train", "pipeline.task"])
    assert chosen == {"train.gamma": 0.9, "train.lr": 1e-3, "pipeline.task": "navigation"}


def test_mlflow_sink_batches_points_into_a_real_store(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    experiment = tracking.setup_tracking(tmp_path, "unit")
    run_id = tracking.start_child_run(experiment, None, "sink")
    sink = tracking.MlflowSink(run_id, flush_every=50)
    for step in range(120):
        sink.log_metrics({"loss": 1.0 / (step + 1), "nan": float("nan")}, step)
    sink.close()
    tracking.end_run(run_id)
    client = MlflowClient()
    history = client.get_metric_history(run_id, "loss")
    assert [m.step for m in history] == list(range(120))
    assert client.get_metric_history(run_id, "nan") == []  # non-finite points are skipped
    assert (tmp_path / "mlruns" / "mlflow.db").exists()


def test_file_md5_is_the_hash_dvc_records(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"lagent")
    import hashlib

    assert tracking.file_md5(path) == hashlib.md5(b"lagent").hexdigest()


def test_deployment_carries_the_cron_schedule() -> None:
    from flows.pipeline import build_deployment

    deployment = build_deployment("0 2 * * *", "nightly", quick=True)
    assert deployment.name == "nightly"
    assert deployment.schedules[0].schedule.cron == "0 2 * * *"
    assert deployment.parameters["quick"] is True


@pytest.mark.parametrize(
    "argv, message",
    [
        (["stage", "nope"], "unknown stage(s) nope"),
        (["pipeline", "--stages", "train_beginner", "bogus"], "unknown stage(s) bogus"),
        (["schedule", "--cron", "not a cron"], "invalid cron expression"),
        (["pipeline", "--set", "pipeline.stage_timesteps=-1"], "stage_timesteps"),
    ],
)
def test_cli_errors_are_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err
