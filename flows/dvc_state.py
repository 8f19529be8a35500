"""One state for Prefect and DVC: a pipeline run through Prefect is recorded in ``dvc.lock``.

``dvc repro`` and the Prefect flow run the same stage functions into the same paths. When the
project is a DVC repository and the run used exactly the params ``params.yaml`` holds, the stages
it ran are committed (``dvc commit``: hashes of deps, params and outs into ``dvc.lock``, outs into
the cache), so ``dvc status`` says the pipeline is up to date and ``dvc repro`` does nothing.
A run with other params (``--quick``, ``--set``, ``--params``) is not recorded: its outputs do not
belong to ``params.yaml``, and DVC will rerun those stages.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class DvcRecord:
    """What happened to DVC's record of the run: the stages committed, or why none were."""

    committed: tuple[str, ...]
    reason: str

    @property
    def line(self) -> str:
        if self.committed:
            return f"recorded {len(self.committed)} stage(s) in dvc.lock: `dvc status` is clean, `dvc repro` has nothing to do"
        return f"not recorded in DVC: {self.reason}"


def is_dvc_project(root: Path) -> bool:
    return (root / "dvc.yaml").is_file() and (root / ".dvc").is_dir()


def _first_difference(left: Mapping[str, Any], right: Mapping[str, Any], prefix: str = "") -> str | None:
    for key in sorted(set(left) | set(right)):
        a, b = left.get(key), right.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            found = _first_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key}"
    return None


def record_run(root: Path, run_params: Mapping[str, Any], stages: Sequence[str]) -> DvcRecord:
    """Commit ``stages`` to DVC if ``root`` is a DVC project and ``run_params`` are its params.yaml's.

    ``run_params`` is the run's resolved params (every layer applied); they are compared with what
    ``params.yaml`` in ``root`` resolves to on its own, which is what ``dvc repro`` would run with.
    """
    if not stages:
        return DvcRecord((), "no stage ran")
    if not is_dvc_project(root):
        return DvcRecord((), f"{root} is not a DVC project (no dvc.yaml and .dvc/)")
    from agent.config import load_raw

    dvc_params = load_raw([root / "params.yaml"])
    differs = _first_difference(dict(run_params), dvc_params)
    if differs is not None:
        return DvcRecord((), f"the run's '{differs}' differs from params.yaml (dvc repro would rerun it)")
    return DvcRecord(tuple(_commit(root, stages)), "")


def _commit(root: Path, stages: Sequence[str]) -> list[str]:
    """``dvc commit --force STAGE...`` in ``root``: DVC resolves stage paths against the working
    directory, which a flow running in another one must not change for its whole process."""
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "commit", "--force", "--quiet", *stages],
        cwd=root,
        capture_output=True,
        text=True,
        env={**os.environ, "DVC_NO_ANALYTICS": "1"},
    )
    if done.returncode != 0:
        raise RuntimeError(f"dvc commit failed in {root}: {(done.stderr or done.stdout).strip()[-2000:]}")
    return list(stages)
