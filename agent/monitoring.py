"""What the machine and the network do while training: the spec's monitoring list beyond rewards.

- :class:`SystemMonitor` reads process memory (RSS) and CPU use with ``psutil``, and GPU memory and
  utilisation with ``torch.cuda`` (utilisation goes through NVML, so it needs ``pynvml``; without it
  that one reading is left out). The trainer reads it once per logging window, never per step.
- :func:`parameter_names` names each parameter after the ``nn.Linear`` layer it belongs to
  (``hidden_0.weight``, ``head.bias``), the names of the per-layer gradient norms and of the
  weight and gradient histograms.
"""

from __future__ import annotations

import logging

import psutil
import torch
from torch import nn

log = logging.getLogger(__name__)

_MB = float(2**20)


class SystemMonitor:
    """Process and device readings for one logging window (``system/...`` scalars).

    ``cpu_percent`` is this process's CPU use since the previous :meth:`read` (or :meth:`start`),
    in percent of one core (two busy threads read 200). GPU keys appear only when ``device`` is a
    CUDA device: memory allocated and reserved by this process's tensors, memory in use on the
    whole device, and its utilisation (percent of the window's time a kernel ran, from NVML).
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self._process = psutil.Process()
        device = torch.device(device) if device is not None else None
        self._cuda = device is not None and device.type == "cuda" and torch.cuda.is_available()
        if self._cuda:
            assert device is not None
            self._gpu = device.index if device.index is not None else torch.cuda.current_device()
        self._nvml = self._cuda  # until torch.cuda.utilization() turns out to be unavailable
        self.start()

    def start(self) -> None:
        """Begin a window: the next ``cpu_percent`` covers the time from now."""
        self._process.cpu_percent(None)

    def read(self) -> dict[str, float]:
        """The window's readings; starts the next window."""
        with self._process.oneshot():
            rss = self._process.memory_info().rss
            cpu = self._process.cpu_percent(None)
        readings = {"system/rss_mb": rss / _MB, "system/cpu_percent": float(cpu)}
        if self._cuda:
            readings.update(self._gpu_readings())
        return readings

    def _gpu_readings(self) -> dict[str, float]:
        free, total = torch.cuda.mem_get_info(self._gpu)
        readings = {
            "system/gpu_memory_allocated_mb": torch.cuda.memory_allocated(self._gpu) / _MB,
            "system/gpu_memory_reserved_mb": torch.cuda.memory_reserved(self._gpu) / _MB,
            "system/gpu_memory_used_mb": (total - free) / _MB,
            "system/gpu_memory_total_mb": total / _MB,
        }
        if self._nvml:
            try:
                readings["system/gpu_utilization"] = float(torch.cuda.utilization(self._gpu))
            except Exception as exc:  # no pynvml, or NVML refuses (containers, MIG): skip it
                self._nvml = False
                log.info("GPU utilisation is not logged: %s", exc)
        return readings


def parameter_names(network: nn.Module) -> dict[int, str]:
    """``id(parameter)`` -> ``"{layer}.{weight|bias}"`` for every parameter of ``network``.

    Hidden layers are ``hidden_0``, ``hidden_1``, ... in order; other linear layers keep their
    attribute name (``head``, ``value_head``, ``advantage_head``). A parameter outside any
    ``nn.Linear`` keeps its ``named_parameters`` name.
    """
    names = {id(p): name for name, p in network.named_parameters()}
    hidden = 0
    for name, module in network.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if name.startswith("body."):
            layer, hidden = f"hidden_{hidden}", hidden + 1
        else:
            layer = name
        for kind, parameter in module.named_parameters(recurse=False):
            names[id(parameter)] = f"{layer}.{kind}"
    return names
