"""torch's global random generator, shared safely by agents built in several threads at once.

torch initialises layers from one process-wide generator. The pipeline runs independent stages in
threads, so two agents built at the same moment would interleave their draws and neither would be
reproducible. Every use of that generator goes through the lock here; everything else (replay
sampling, dropout, exploration) draws from generators of its own.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

_GLOBAL_RNG_LOCK = threading.RLock()


@contextlib.contextmanager
def seeded_torch_rng(seed: int) -> Iterator[None]:
    """Draw from torch's global generator seeded with ``seed``, then put it back as it was.

    Holds the lock throughout: keep the block short (building layers, not training).
    """
    with _GLOBAL_RNG_LOCK:
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        try:
            yield
        finally:
            torch.set_rng_state(saved)


@contextlib.contextmanager
def preserved_torch_rng() -> Iterator[None]:
    """Leave torch's global generator as the block found it (the block may run long: the lock is
    held only to read and to restore the state)."""
    with _GLOBAL_RNG_LOCK:
        saved = torch.get_rng_state()
    try:
        yield
    finally:
        with _GLOBAL_RNG_LOCK:
            torch.set_rng_state(saved)
