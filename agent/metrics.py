"""Where training metrics go: a small sink interface, so the learner never imports a tracker.

TensorBoard is the built-in sink; the MLflow sink lives with the orchestration code in ``flows/``.
Sinks receive already-aggregated scalars (the trainer logs every ``log_interval`` steps and at
episode ends), so a slow backend never sits in the per-step hot path. A sink may also record
histograms (``log_histogram``: weights and gradients every ``train.histogram_interval`` updates);
TensorBoard does, a sink without the method (MLflow's) is skipped, see :func:`log_histogram`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class MetricsSink(Protocol):
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Record scalars at an environment step."""

    def close(self) -> None:
        """Flush and release resources."""


@runtime_checkable
class HistogramSink(Protocol):
    """A sink that also records distributions (optional: :func:`log_histogram` skips the others)."""

    def log_histogram(self, name: str, values: Any, step: int) -> None:
        """Record the distribution of ``values`` (an array or tensor) at an environment step."""


def log_histogram(sink: MetricsSink, name: str, values: Any, step: int) -> None:
    """Send a histogram to ``sink`` if it records them; a sink without ``log_histogram`` ignores it."""
    method = getattr(sink, "log_histogram", None)
    if method is not None:
        method(name, values, step)


class NullSink:
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_histogram(self, name: str, values: Any, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class InMemorySink:
    """Keeps every logged row: handy in tests and notebooks."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, dict[str, float]]] = []
        self.histograms: list[tuple[int, str, np.ndarray]] = []

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.rows.append((step, dict(metrics)))

    def log_histogram(self, name: str, values: Any, step: int) -> None:
        self.histograms.append((step, name, np.asarray(values).copy()))

    def series(self, name: str) -> list[tuple[int, float]]:
        return [(step, row[name]) for step, row in self.rows if name in row]

    def close(self) -> None:
        pass


class TensorBoardSink:
    """Writes event files readable by ``tensorboard --logdir``."""

    def __init__(self, log_dir: str | Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imported lazily: it is slow to load

        self.log_dir = Path(log_dir)
        self._writer = SummaryWriter(log_dir=str(self.log_dir))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for name, value in metrics.items():
            self._writer.add_scalar(name, value, global_step=step)

    def log_histogram(self, name: str, values: Any, step: int) -> None:
        # 64 equal-width bins: a third of the cost of TensorFlow's default buckets, and
        # TensorBoard shows about 30 anyway.
        self._writer.add_histogram(name, values, global_step=step, bins=64)

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()


class MultiSink:
    """Fans metrics out to several sinks."""

    def __init__(self, sinks: Sequence[MetricsSink]) -> None:
        self.sinks = list(sinks)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for sink in self.sinks:
            sink.log_metrics(metrics, step)

    def log_histogram(self, name: str, values: Any, step: int) -> None:
        for sink in self.sinks:
            log_histogram(sink, name, values, step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
