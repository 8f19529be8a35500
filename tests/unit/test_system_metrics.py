"""The spec's monitoring list: system readings, throughput, per-layer gradient norms, weight and
gradient histograms, and the Memory service's round-trip latency, through the metrics sinks."""

from __future__ import annotations

import asyncio
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest
import torch

from agent import InMemorySink, LearningAgent, TrainingManager
from agent.memory_client import LatencyWindow, MemoryClient
from agent.metrics import MultiSink, log_histogram
from agent.monitoring import SystemMonitor

LAYERS = ("hidden_0", "hidden_1", "head")  # the small config's network: two hidden layers, a head


def train(config: Any, steps: int = 400, **kwargs: Any) -> tuple[TrainingManager, InMemorySink]:
    sink = InMemorySink()
    agent = LearningAgent(4, 2, config=config)
    trainer = TrainingManager(agent, task_type="CartPole-v1", metrics_sink=sink, **kwargs)
    asyncio.run(trainer.train(total_timesteps=steps))
    trainer.close()
    return trainer, sink


def test_every_logging_window_reports_system_readings_and_throughput(small_config):
    _, sink = train(small_config("train.log_interval=100", "run.device=cpu"), tensorboard=False)
    windows = [row for _, row in sink.rows if "system/rss_mb" in row]
    assert len(windows) == 4  # one per window of 100 steps, read there and nowhere else
    for row in windows:
        assert row["system/rss_mb"] > 10.0  # a Python process with torch holds far more than 10 MB
        assert row["system/cpu_percent"] >= 0.0
        assert row["time/steps_per_second"] > 0.0
        assert not any(key.startswith("system/gpu") for key in row)  # CPU run: no GPU keys
    learning = [row for row in windows if row["train/training_steps"] > 0]
    assert learning and all(row["time/updates_per_second"] > 0.0 for row in learning)


@pytest.mark.parametrize("closed_form", [True, False], ids=["closed_form", "autograd"])
def test_per_layer_gradient_norms_on_both_update_paths(small_config, closed_form):
    config = small_config("train.log_interval=100", f"train.closed_form_update={str(closed_form).lower()}")
    trainer, sink = train(config, tensorboard=False)
    assert trainer.agent.learner.uses_closed_form is closed_form
    rows = [row for _, row in sink.rows if "train/grad_norm" in row]
    assert rows
    for row in rows:
        norms = [row[f"grad_norm/{layer}"] for layer in LAYERS]
        assert all(math.isfinite(n) and n > 0 for n in norms)

    # One update: the layers' norms make up the global norm the agent reports (before clipping).
    agent = trainer.agent
    stats = asyncio.run(agent.learn_from_experiences(gradient_steps=1))
    layers = agent.layer_gradient_norms()
    assert tuple(layers) == LAYERS
    assert math.sqrt(sum(n * n for n in layers.values())) == pytest.approx(stats["grad_norm"], rel=1e-5)


def test_both_update_paths_give_the_same_layer_norms(small_config):
    found = []
    for closed_form in ("true", "false"):
        agent = LearningAgent(4, 2, config=small_config(f"train.closed_form_update={closed_form}"))
        rng = np.random.default_rng(0)
        obs = rng.normal(size=(64, 4)).astype(np.float32)
        actions, rewards = rng.integers(0, 2, 64), rng.normal(size=64)
        asyncio.run(agent.store_experience(obs, actions, rewards, obs, np.zeros(64)))
        asyncio.run(agent.learn_from_experiences())
        found.append(agent.layer_gradient_norms())
    assert found[0].keys() == found[1].keys()
    for layer in found[0]:
        assert found[0][layer] == pytest.approx(found[1][layer], rel=1e-4)


def test_a_dueling_network_names_its_heads(small_config):
    agent = LearningAgent(4, 2, config=small_config("network.dueling=true"))
    obs = np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32)
    asyncio.run(agent.store_experience(obs, np.zeros(32), np.ones(32), obs, np.zeros(32)))
    asyncio.run(agent.learn_from_experiences())
    assert set(agent.layer_gradient_norms()) == {"hidden_0", "hidden_1", "value_head", "advantage_head"}


def test_histograms_reach_tensorboard_every_n_updates(small_config, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import HISTOGRAMS, EventAccumulator

    config = small_config("train.histogram_interval=25", "train.log_interval=100")
    trainer, sink = train(config, steps=400, run_dir=tmp_path)
    updates = trainer.agent.training_steps
    assert updates >= 50
    names = {
        f"{kind}/{layer}.{p}" for kind in ("weights", "gradients") for layer in LAYERS for p in ("weight", "bias")
    }
    assert {name for _, name, _ in sink.histograms} == names
    assert len(sink.histograms) == len(names) * (updates // 25)

    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={HISTOGRAMS: 0})
    events.Reload()
    assert set(events.Tags()[HISTOGRAMS]) == names
    written = events.Histograms("weights/hidden_1.weight")
    assert len(written) == updates // 25
    assert written[-1].histogram_value.num == 32 * 32  # every weight of the 32x32 hidden layer
    steps = [event.step for event in written]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)  # env steps, one per snapshot
    gradient = events.Histograms("gradients/head.bias")[-1].histogram_value
    assert gradient.num == 2 and gradient.sum_squares > 0  # a real gradient, not zeros


def test_histogram_interval_zero_writes_none(small_config):
    trainer, sink = train(small_config("train.histogram_interval=0"), steps=300, tensorboard=False)
    assert trainer.agent.training_steps > 0 and sink.histograms == [] and not trainer.agent.histograms


def test_histogram_interval_is_validated():
    from agent.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="histogram_interval"):
        load_config(overrides=["train.histogram_interval=-1"])


def test_sinks_without_histograms_are_skipped():
    class ScalarsOnly:  # like flows.tracking.MlflowSink: log_metrics and close only
        def log_metrics(self, metrics, step):
            pass

        def close(self):
            pass

    memory = InMemorySink()
    fan_out = MultiSink([ScalarsOnly(), memory])
    log_histogram(fan_out, "weights/head.bias", np.arange(3.0), 7)
    log_histogram(ScalarsOnly(), "ignored", np.arange(3.0), 7)
    assert [(step, name) for step, name, _ in memory.histograms] == [(7, "weights/head.bias")]


def test_latency_window_percentiles_and_reset():
    window = LatencyWindow()
    assert window.summary() == {"round_trips": 0.0}  # no request: no percentiles to invent
    reads = np.arange(1, 101) / 1000.0  # 1 ms ... 100 ms
    for seconds in reads:
        window.record("read", float(seconds))
    window.record("write", 0.5)
    summary = window.summary()
    every = np.append(reads, 0.5) * 1000.0
    assert summary["round_trips"] == 101
    assert summary["latency_p50_ms"] == pytest.approx(np.percentile(every, 50))
    assert summary["latency_p99_ms"] == pytest.approx(np.percentile(every, 99))
    assert summary["latency_max_ms"] == pytest.approx(500.0)
    assert summary["read_latency_p50_ms"] == pytest.approx(50.5)
    assert summary["read_latency_p99_ms"] == pytest.approx(np.percentile(reads * 1000.0, 99))
    assert summary["write_latency_p50_ms"] == summary["write_latency_p99_ms"] == pytest.approx(500.0)
    window.reset()
    assert window.summary() == {"round_trips": 0.0}


class _Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        body = b'{"status": "ok"}'
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_memory_client_times_its_round_trips(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    client = MemoryClient(f"http://127.0.0.1:{server.server_port}", outbox_dir=tmp_path / "outbox")

    async def run() -> tuple[dict[str, float], dict[str, float]]:
        for _ in range(5):
            assert await client.health_check()
        before = client.metrics()
        client.new_latency_window()
        after = client.metrics()
        await client.close()
        return before, after

    try:
        before, after = asyncio.run(run())
    finally:
        server.shutdown()
        server.server_close()
    assert before["round_trips"] == 5
    assert 0.0 < before["latency_p50_ms"] <= before["latency_p99_ms"] <= before["latency_max_ms"] < 5000
    assert before["read_latency_p50_ms"] == before["latency_p50_ms"]
    assert after["round_trips"] == 0 and "latency_p50_ms" not in after  # a new window


class _TimedMemory:
    """Just enough of MemoryClient for a training run: stores, no replay, fixed latencies."""

    def __init__(self) -> None:
        self.windows = 0

    def write_transitions(self, *arrays: Any) -> None:
        pass

    def sample_replay(self, *args: Any, **kwargs: Any) -> None:
        return None

    def find_similar(self, *args: Any, **kwargs: Any) -> None:
        return None

    def metrics(self) -> dict[str, float]:
        return {"healthy": 1.0, "round_trips": 3.0, "latency_p50_ms": 1.5, "latency_p99_ms": 9.0}

    def new_latency_window(self) -> None:
        self.windows += 1


def test_the_trainer_logs_memory_latency_per_window(small_config):
    memory = _TimedMemory()
    _, sink = train(small_config("train.log_interval=100"), memory_client=memory, tensorboard=False)
    rows = [row for _, row in sink.rows if "memory/latency_p50_ms" in row]
    assert len(rows) == memory.windows >= 4  # each window reads the percentiles, then starts anew
    assert rows[0]["memory/latency_p50_ms"] == 1.5 and rows[0]["memory/latency_p99_ms"] == 9.0


def test_gpu_readings_when_cuda_is_used(monkeypatch):
    """The CUDA branch, faked on a CPU machine: memory from torch.cuda, utilisation from NVML,
    and a missing pynvml costs that one reading only (logged once), not the others."""
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "mem_get_info", lambda device=None: (6 * 2**30, 8 * 2**30))
    monkeypatch.setattr(cuda, "memory_allocated", lambda device=None: 3 * 2**20)
    monkeypatch.setattr(cuda, "memory_reserved", lambda device=None: 4 * 2**20)
    monkeypatch.setattr(cuda, "utilization", lambda device=None: 37)
    monitor = SystemMonitor(torch.device("cuda:0"))
    readings = monitor.read()
    assert readings["system/gpu_memory_allocated_mb"] == 3.0
    assert readings["system/gpu_memory_reserved_mb"] == 4.0
    assert readings["system/gpu_memory_used_mb"] == 2048.0
    assert readings["system/gpu_utilization"] == 37.0

    def no_pynvml(device=None):
        raise ModuleNotFoundError("pynvml does not seem to be installed or it can't be imported.")

    monkeypatch.setattr(cuda, "utilization", no_pynvml)
    without = SystemMonitor(torch.device("cuda:0"))
    assert "system/gpu_utilization" not in without.read()
    assert without.read()["system/gpu_memory_used_mb"] == 2048.0 and without.read()["system/rss_mb"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_readings_on_a_real_device():
    tensor = torch.ones(1024, 1024, device="cuda")  # 4 MB the readings must see
    readings = SystemMonitor(torch.device("cuda")).read()
    assert readings["system/gpu_memory_allocated_mb"] >= 4.0
    assert 0 < readings["system/gpu_memory_used_mb"] <= readings["system/gpu_memory_total_mb"]
    del tensor
