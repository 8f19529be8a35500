"""Plain JSON data from what results hold (enums, paths, tuples, numpy and torch scalars).

Reports are written by the library (search results, adaptation reports) and by the pipeline
stages; one conversion keeps them alike, so a value that writes in one place writes in the other.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any


def jsonable(value: Any) -> Any:
    """``value`` as plain data: enums to their values, paths to strings, mappings to dicts with
    string keys, tuples and lists to lists, numpy arrays to lists and numpy or torch scalars to
    numbers. Anything else is returned as it is (``json.dumps`` then names what it cannot write).
    """
    if isinstance(value, enum.Enum):
        return jsonable(value.value)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, bytes, bool, int, float)) or value is None:
        return value
    tolist = getattr(value, "tolist", None)  # numpy arrays and scalars, torch tensors
    if callable(tolist):
        return jsonable(tolist())
    return value
