"""Service settings: limits at the boundary and index tuning, one field per knob."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import psutil

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def machine_memory_bytes() -> int:
    """RAM this process may use: the machine's, or its cgroup's limit (a container) if lower."""
    total = psutil.virtual_memory().total
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()  # cgroup v2
    except OSError:
        limit = "max"
    return min(total, int(limit)) if limit.isdigit() else total


def default_memory_budget() -> int:
    """Half the machine's RAM: the rest is for the process itself, SQLite's page cache, the
    answers being built, and an index's second copy while it is rebuilt."""
    return machine_memory_bytes() // 2


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    """Where the SQLite log lives (``memory.db``); everything in RAM is rebuilt from it."""
    token: str | None = None
    """Bearer token every request must carry; required when binding beyond loopback."""
    max_body_bytes: int = 64 * 1024 * 1024
    """Largest request body; bigger ones get 413 before they are read."""
    max_batch_rows: int = 65_536
    """Most transitions in one stored batch."""
    max_sample: int = 65_536
    """Largest replay batch one request may ask for."""
    max_reply_bytes: int = 128 * 1024 * 1024
    """Largest answer a read may ask for (rows x row size); bigger requests get 422."""
    max_k: int = 256
    """Most neighbours one search may ask for per query."""
    max_queries: int = 4_096
    """Most query states in one search."""
    default_capacity: int = 1_000_000
    """Capacity of a collection created without one (FIFO eviction beyond it)."""
    max_capacity: int = 100_000_000
    """Largest capacity a collection may ask for."""
    max_collections: int = 1_000
    """Collections one service keeps at most (each holds its own ring and index)."""
    max_memory_bytes: int = field(default_factory=default_memory_budget)
    """RAM all collections may reserve together: each reserves what its ring, sum tree and index
    hold at full capacity (:func:`memory.service.reserved_bytes`), and a create that would go
    beyond the budget is refused with 507. Default: half the machine's RAM."""
    exact_max: int = 100_000
    """Stored states up to which search scans exactly; faiss IVF beyond."""
    nprobe: int = 16
    """Inverted lists an IVF search visits (recall against speed)."""
    faiss_threads: int = 1
    """OpenMP threads for faiss; more than one collapses under contention on 2 shared cores."""
    seed: int | None = None
    """Seed of the sampling generator (None: fresh entropy)."""

    @property
    def db_path(self) -> Path:
        return self.data_dir / "memory.db"
