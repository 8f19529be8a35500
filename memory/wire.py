"""The binary body of the hot path: named numpy arrays behind a small JSON header.

Layout (all integers little-endian)::

    b"MWB1" | uint32 header length | header (UTF-8 JSON, space-padded to 8 bytes) | array data

The header is ``{"arrays": [{"name", "dtype", "shape"}, ...], "meta": {...}}``; array data follows
in header order, each array padded to a multiple of 8 bytes so the next one starts aligned. JSON
keeps the header readable and extensible; it is tiny next to the arrays, so it costs nothing.

This module imports numpy and the standard library only: the client (``agent/memory_client/``)
shares it with the server, and must not pull in any server code.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

COLLECTION_NAME = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$"
"""A collection name, for the service and its clients alike. It starts with a letter, digit or
underscore: "." and ".." would be normalised out of a URL path by any HTTP client."""
COLLECTION_NAME_RULE = "1-64 of A-Z a-z 0-9 _ . -, starting with a letter, digit or _"


def is_collection_name(name: object) -> bool:
    return isinstance(name, str) and re.fullmatch(COLLECTION_NAME, name) is not None


CONTENT_TYPE = "application/octet-stream"
MAGIC = b"MWB1"
_PREFIX = struct.Struct("<4sI")
PREFIX_BYTES = _PREFIX.size
"""The shortest possible body: magic and header length."""
_ALIGN = 8
MAX_HEADER_BYTES = 64 * 1024
MAX_ARRAYS = 32
MAX_NDIM = 4

# Little-endian (or byte-order-free) dtypes only: a reader never has to guess the byte order.
ALLOWED_DTYPES: frozenset[str] = frozenset(
    {"<f2", "<f4", "<f8", "|i1", "<i2", "<i4", "<i8", "|u1", "<u2", "<u4", "<u8", "|b1"}
)


class WireError(ValueError):
    """A binary body that does not follow the format; the message says where it went wrong."""


def _pad(n: int) -> int:
    return (-n) % _ALIGN


def encode(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any] | None = None) -> bytes:
    """One binary body from named arrays (converted to contiguous little-endian) and metadata."""
    parts: list[bytes] = []
    described = []
    for name, value in arrays.items():
        array = np.asarray(value, order="C")  # (ascontiguousarray would turn 0-d into 1-d)
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        if array.dtype.str not in ALLOWED_DTYPES:
            raise WireError(f"{name}: dtype {array.dtype} cannot be sent")
        described.append({"name": name, "dtype": array.dtype.str, "shape": list(array.shape)})
        data = array.tobytes()
        parts.append(data)
        if pad := _pad(len(data)):
            parts.append(b"\0" * pad)
    header = json.dumps({"arrays": described, "meta": dict(meta or {})}, separators=(",", ":"))
    header_bytes = header.encode()
    header_bytes += b" " * _pad(_PREFIX.size + len(header_bytes))
    return b"".join([_PREFIX.pack(MAGIC, len(header_bytes)), header_bytes, *parts])


def _read_header(view: memoryview) -> tuple[dict[str, Any], int]:
    if len(view) < _PREFIX.size:
        raise WireError(f"body of {len(view)} bytes is shorter than the {_PREFIX.size}-byte prefix")
    magic, header_len = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise WireError(f"body does not start with {MAGIC!r} (got {bytes(magic)!r})")
    if header_len > MAX_HEADER_BYTES:
        raise WireError(f"header of {header_len} bytes exceeds the {MAX_HEADER_BYTES}-byte limit")
    end = _PREFIX.size + header_len
    if end > len(view):
        raise WireError(f"header claims {header_len} bytes but the body ends first")
    try:
        header = json.loads(bytes(view[_PREFIX.size : end]).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError(f"header is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict):
        raise WireError("header must be a JSON object")
    return header, end


def read_meta(body: bytes | bytearray | memoryview) -> dict[str, Any]:
    """The metadata of a body without touching its arrays (the outbox reads keys this way)."""
    header, _ = _read_header(memoryview(body))
    meta = header.get("meta", {})
    if not isinstance(meta, dict):
        raise WireError("header 'meta' must be a JSON object")
    return meta


def _array_spec(entry: Any, index: int) -> tuple[str, np.dtype, tuple[int, ...]]:
    if not isinstance(entry, dict):
        raise WireError(f"arrays[{index}] must be an object with name, dtype and shape")
    name, dtype, shape = entry.get("name"), entry.get("dtype"), entry.get("shape")
    if not isinstance(name, str) or not 0 < len(name) <= 64:
        raise WireError(f"arrays[{index}].name must be a string of 1 to 64 characters")
    if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
        raise WireError(f"{name}: dtype {dtype!r} is not one of {sorted(ALLOWED_DTYPES)}")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
    ):
        raise WireError(f"{name}: shape must be a list of at most {MAX_NDIM} non-negative integers")
    return name, np.dtype(dtype), tuple(shape)


def decode(
    body: bytes | bytearray | memoryview, *, writable: bool = False
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Named arrays and metadata from a binary body.

    The arrays are views into the body (no copy); ``writable=True`` copies the body once so that
    callers such as ``torch.as_tensor`` get writable arrays. Every length is checked against the
    body before a view is made, so a truncated or padded body raises :class:`WireError`.
    """
    buffer = bytearray(body) if writable else body
    view = memoryview(buffer)
    header, offset = _read_header(view)
    entries = header.get("arrays")
    if not isinstance(entries, list) or len(entries) > MAX_ARRAYS:
        raise WireError(f"header 'arrays' must be a list of at most {MAX_ARRAYS} entries")
    meta = header.get("meta", {})
    if not isinstance(meta, dict):
        raise WireError("header 'meta' must be a JSON object")
    arrays: dict[str, np.ndarray] = {}
    for index, entry in enumerate(entries):
        name, dtype, shape = _array_spec(entry, index)
        if name in arrays:
            raise WireError(f"array {name!r} appears twice")
        count = 1
        for n in shape:
            count *= n
        nbytes = count * dtype.itemsize
        if offset + nbytes > len(view):
            raise WireError(f"{name}: needs {nbytes} bytes but only {len(view) - offset} remain")
        arrays[name] = np.frombuffer(buffer, dtype=dtype, count=count, offset=offset).reshape(shape)
        offset += nbytes + _pad(nbytes)
    if offset < len(view):
        raise WireError(f"{len(view) - offset} unexpected bytes after the last array")
    return arrays, meta
