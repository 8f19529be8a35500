"""How numbers read in what people look at: the CLI's tables, the pipeline's summaries, reports
and model card. One place, so a success rate reads the same everywhere."""

from __future__ import annotations

from typing import Any


def percent(value: Any, missing: str = "-") -> str:
    """A rate in [0, 1] as a whole percentage ('83%'); ``missing`` when there is none."""
    return missing if value is None else f"{float(value):.0%}"


def number(value: Any, digits: int = 4) -> str:
    """A float to ``digits`` significant digits, anything else as text, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)
