"""n-step returns through the CLI: a resumed run is the same run (its open windows travel with
the checkpoint), as tests/integration/test_cartpole_learning.py checks for 1-step returns."""

from __future__ import annotations

import pytest
import torch

from flows.cli import main
from tests.integration.test_cartpole_learning import _weights

pytestmark = pytest.mark.slow


def test_an_n_step_resume_equals_a_straight_run(tmp_path):
    # Schedules fixed by the first run's budget (linear exploration, as CartPole's tuned profile
    # has) would differ between a 6k run and a 12k one: per-episode exploration has none.
    common = ["--task", "CartPole-v1", "--seed", "7", "--eval-episodes", "0", "--no-progress",
              "--set", "network.hidden_size=64", "--set", "train.train_freq=8", "--set", "replay.n_step=3",
              "--set", "train.exploration=exponential", "--set", "train.gradient_steps=1",
              "--set", "replay.local_buffer_size=20000",
              # CartPole's profile lowers the rate over the budget the first run names: constant here
              "--set", "train.lr_schedule=constant"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["train", "--timesteps", "12000", "--run-dir", str(straight), *common]) == 0
    assert main(["train", "--timesteps", "6000", "--run-dir", str(split), *common]) == 0
    pending = torch.load(split / "checkpoints" / "last.pt", weights_only=True)["trainer"]["n_step_windows"]
    assert int(pending["count"].sum()) > 0  # the checkpoint holds steps not yet in a transition
    assert main(["train", "--resume", str(split), "--timesteps", "12000", "--eval-episodes", "0", "--no-progress"]) == 0

    a_net, a_opt, a_steps = _weights(straight / "checkpoints" / "last.pt")
    b_net, b_opt, b_steps = _weights(split / "checkpoints" / "last.pt")
    assert a_steps == b_steps > 0
    for name in a_net:
        assert torch.equal(a_net[name], b_net[name]), name
    for index in a_opt:
        assert torch.equal(a_opt[index]["exp_avg_sq"], b_opt[index]["exp_avg_sq"])
    assert (straight / "episodes.csv").read_text() == (split / "episodes.csv").read_text()
