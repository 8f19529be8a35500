"""How a pipeline run shows its progress: a live display on a terminal, plain lines when piped.

The Prefect flow runs stages in worker threads; each stage reports to the reporter installed for
the process (:func:`reporting`), so the flow's signature stays plain data (a deployment can run it
on a worker that has no display at all, where the reporter is the silent default).
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Protocol, TextIO


class PipelineReporter(Protocol):
    """What the flow tells whoever watches it. Called from several threads at once."""

    def stage_started(self, name: str) -> None: ...

    def stage_progress(self, name: str, completed: float, total: float | None, status: str = "") -> None: ...

    def stage_finished(self, name: str, summary: str, seconds: float, failed: bool = False) -> None: ...


class SilentReporter:
    """The default: a flow run by a worker or a test reports to nobody."""

    def stage_started(self, name: str) -> None:
        pass

    def stage_progress(self, name: str, completed: float, total: float | None, status: str = "") -> None:
        pass

    def stage_finished(self, name: str, summary: str, seconds: float, failed: bool = False) -> None:
        pass


class PlainReporter:
    """One line per event, for logs and pipes: a stage's start, each quarter of it, its end."""

    def __init__(self, stages: Sequence[str], stream: TextIO | None = None) -> None:
        self._stream = stream or sys.stdout
        self._total = len(stages)
        self._done = 0
        self._quarters: dict[str, int] = {}
        self._lock = threading.Lock()

    def _line(self, text: str) -> None:
        with self._lock:  # write, not print: the flow's log_prints would turn a print into a log record
            self._stream.write(f"[pipeline {time.strftime('%H:%M:%S')}] {text}\n")
            self._stream.flush()

    def stage_started(self, name: str) -> None:
        self._quarters[name] = 0
        self._line(f"{name}: started")

    def stage_progress(self, name: str, completed: float, total: float | None, status: str = "") -> None:
        if not total:
            return
        quarter = min(4, int(4 * completed / total))
        if 0 < quarter < 4 and quarter > self._quarters.get(name, 0):
            self._quarters[name] = quarter
            self._line(f"{name}: {25 * quarter}% ({completed:,.0f}/{total:,.0f}){'  ' + status if status else ''}")

    def stage_finished(self, name: str, summary: str, seconds: float, failed: bool = False) -> None:
        with self._lock:
            self._done += 0 if failed else 1  # a failed attempt may be retried: only a success counts
            done = self._done
        verdict = "FAILED" if failed else "done"
        self._line(f"{name}: {verdict} in {seconds:.0f} s ({done}/{self._total} stages): {summary}")


class RichReporter:
    """A live display on a terminal: the stages done, each running stage's bar, the overall count."""

    def __init__(self, stages: Sequence[str], console: object | None = None) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.console = console if console is not None else Console(stderr=True)
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),
            console=self.console,  # type: ignore[arg-type]
        )
        self._overall = self.progress.add_task("[bold]pipeline", total=len(stages), status="")
        self._tasks: dict[str, int] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> RichReporter:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def stage_started(self, name: str) -> None:
        with self._lock:
            self._tasks[name] = self.progress.add_task(f"  {name}", total=None, status="running")

    def stage_progress(self, name: str, completed: float, total: float | None, status: str = "") -> None:
        task = self._tasks.get(name)
        if task is not None:
            self.progress.update(task, completed=completed, total=total, status=status)

    def stage_finished(self, name: str, summary: str, seconds: float, failed: bool = False) -> None:
        with self._lock:
            task = self._tasks.pop(name, None)
        if task is not None:
            self.progress.remove_task(task)
        mark = "[red]✗ failed" if failed else "[green]✓"
        self.progress.console.print(f"{mark}[/] [bold]{name}[/] ({seconds:.0f} s): {summary}", highlight=False)
        if not failed:  # a failed attempt may be retried: only a success counts
            self.progress.advance(self._overall)


_current: PipelineReporter = SilentReporter()


def current() -> PipelineReporter:
    """The reporter stages report to in this process."""
    return _current


@contextlib.contextmanager
def reporting(reporter: PipelineReporter) -> Iterator[PipelineReporter]:
    """Install ``reporter`` for the pipeline run inside the block (and its worker threads)."""
    global _current
    previous, _current = _current, reporter
    try:
        if isinstance(reporter, RichReporter):
            with reporter:
                yield reporter
        else:
            yield reporter
    finally:
        _current = previous


def reporter_for(stages: Sequence[str], enabled: bool, stream: TextIO | None = None) -> PipelineReporter:
    """A live display when stderr is a terminal (and ``enabled``), plain lines otherwise."""
    from rich.console import Console

    console = Console(stderr=True)
    if enabled and console.is_terminal:
        return RichReporter(stages, console)
    return PlainReporter(stages, stream)
