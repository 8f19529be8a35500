"""Shared test setup: one torch thread, quiet third-party telemetry, small-config helpers."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
# Tests write their own stores under tmp_path; never into the tracking server a user has exported.
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("PREFECT_API_URL", None)

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def small_config():
    """A fast CartPole configuration: small network, frequent updates, tiny budgets."""
    from agent.config import load_config

    def make(*overrides: str):
        return load_config(
            overrides=[
                "network.hidden_size=32",
                "train.learning_starts=64",
                "train.batch_size=16",
                "train.log_interval=200",
                *overrides,
            ]
        )

    return make
