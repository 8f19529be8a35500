"""What every ``lagent`` subcommand shares: the config arguments, one-line errors, progress bars,
signal handling, and output (human lines, or one JSON object last with ``--json``).

The subcommand modules (``cli_train``, ``cli_meta``, ``cli_pipeline``) import this; ``flows.cli``
only builds the parser from them and dispatches, so no subcommand imports the entry point.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from agent.jsonable import jsonable

if TYPE_CHECKING:
    from agent.config import Config

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A problem the user can fix: printed as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (a UsageError), not argparse's usage dump."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


# --------------------------------------------------------------------------- arguments


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The configuration layers (``--params``, ``--set``) and the output switches."""
    parser.add_argument(
        "--params", action="append", default=[], metavar="FILE",
        help="a params.yaml-shaped file layered over the defaults (repeatable)",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="overrides",
        help="override one setting, e.g. --set train.learning_rate=0.0005 (repeatable)",
    )
    parser.add_argument("--json", action="store_true", help="end the output with one JSON object")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def load_cli_config(args: argparse.Namespace, extra: Sequence[str] = ()) -> Config:
    """The resolved configuration: params.yaml, ``--params`` files, ``--set`` and then ``extra``.

    A Gymnasium env gets ``gym_profiles`` under the files and overrides: its tuned settings if
    params.yaml has them, else the defaults meant for an env nobody tuned.
    """
    from agent.config import load_config

    config = load_config(args.params, [*args.overrides, *extra])
    if is_gym_env(config.train.task):
        config = load_config(args.params, [*args.overrides, *extra], gym_env=True)
    return config


def is_gym_env(task: str) -> bool:
    """A Gymnasium env id rather than one of the project's task types."""
    from agent.tasks import TaskType

    return TaskType.parse(task) is None


def gym_profile_note(args: argparse.Namespace, task: str) -> str | None:
    """The line a run of a Gymnasium env starts with: which settings it uses and how to change them."""
    if not is_gym_env(task):
        return None
    from agent.config import gym_profile, load_raw

    described, _ = gym_profile(load_raw(args.params, [*args.overrides, f"train.task={task}"]))
    return f"using {described}; --set overrides it"


def default_run_dir(task: str, seed: int) -> Path:
    """CleanRL-style run names: ``{task}__{seed}__{unix time}``."""
    safe = task.replace("/", "_")
    return Path("runs") / f"{safe}__{seed}__{int(time.time())}"


# --------------------------------------------------------------------------- output


def echo(message: str, args: argparse.Namespace) -> None:
    """Human-readable lines go to stderr when --json keeps stdout for the JSON object."""
    print(message, file=sys.stderr if args.json else sys.stdout, flush=True)


def console(args: argparse.Namespace) -> Any:
    """A rich console for tables, on stderr when --json keeps stdout for the JSON object."""
    from rich.console import Console

    return Console(stderr=bool(args.json), soft_wrap=True)


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: report them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def json_text(payload: Mapping[str, Any], indent: int | None = None) -> str:
    """``payload`` as JSON: plain data (see :func:`agent.jsonable.jsonable`), non-finite numbers
    as null, anything else as its text."""
    return json.dumps(_finite(jsonable(dict(payload))), indent=indent, default=str)


def emit_json(payload: Mapping[str, Any]) -> None:
    """The one JSON object ``--json`` promises, as the last line on stdout."""
    print(json_text(payload), flush=True)


def ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    """``payload`` as an indented JSON file (its directory created)."""
    ensure_dir(path.parent)
    path.write_text(json_text(payload, indent=2) + "\n")


# --------------------------------------------------------------------------- progress and signals


@contextmanager
def progress_bars(enabled: bool, tasks: Mapping[str, tuple[str, float | None]]) -> Iterator[Callable[..., None]]:
    """Rich progress bars on stderr, one per named task; a no-op callback off a terminal.

    ``tasks`` maps a key to (description, total); the callback is ``update(key, completed,
    total=None, status="")``.
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    stderr = Console(stderr=True)
    if not (enabled and stderr.is_terminal):
        yield lambda *args, **kwargs: None
        return
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),  # "12/?" while the total is unknown (an episode budget, a timeout)
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=stderr,
    ) as bar:
        ids = {key: bar.add_task(text, total=total, status="") for key, (text, total) in tasks.items()}

        def update(key: str, completed: float, total: float | None = None, status: str = "") -> None:
            bar.update(ids[key], completed=completed, status=status, **({"total": total} if total else {}))

        yield update


@contextmanager
def progress_bar(enabled: bool, description: str) -> Iterator[Callable[[Mapping[str, float]], None]]:
    """One training progress bar, fed the trainer's progress dicts (steps or episodes)."""
    with progress_bars(enabled, {"train": (description, None)}) as update_bar:

        def update(info: Mapping[str, float]) -> None:
            by_steps = info.get("total_steps", 0) > 0
            total = info["total_steps"] if by_steps else info.get("total_episodes") or None
            done = info["step"] if by_steps else info.get("episodes", 0)
            reward = info.get("reward_mean", float("nan"))
            status = f"reward {reward:8.2f}  eps {info.get('epsilon', 0):.3f}" if reward == reward else ""
            update_bar("train", done, total=total, status=status)

        yield update


@contextmanager
def stop_on_signals(stop: Callable[[], None]) -> Iterator[list[int]]:
    """Turn SIGINT/SIGTERM into a clean stop at the next step (then a checkpoint is written)."""
    received: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if received:  # a second Ctrl-C means "now"
            raise KeyboardInterrupt
        received.append(signum)
        stop()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
