"""The binary body format shared by the Memory service and its client."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from memory import wire

DTYPES = ["<f4", "<f8", "<i8", "<i4", "|u1", "|b1", "<f2"]


def test_round_trip_keeps_names_dtypes_shapes_values_and_meta() -> None:
    arrays = {
        "obs": np.arange(12, dtype=np.float32).reshape(3, 4),
        "actions": np.array([1, 2, 3], dtype=np.int64),
        "dones": np.array([True, False, True]),
        "odd": np.arange(3, dtype=np.uint8),  # 3 bytes: the next array must still start aligned
        "empty": np.zeros((0, 5), dtype=np.float32),
        "scalar": np.array(2.5),
    }
    body = wire.encode(arrays, {"k": 5, "note": "hi"})
    decoded, meta = wire.decode(body)
    assert meta == {"k": 5, "note": "hi"}
    assert list(decoded) == list(arrays)
    for name, value in arrays.items():
        assert decoded[name].dtype == value.dtype and decoded[name].shape == value.shape
        np.testing.assert_array_equal(decoded[name], value)
    assert wire.read_meta(body) == meta


def test_big_endian_and_non_contiguous_input_is_normalised() -> None:
    value = np.arange(20, dtype=">f4").reshape(4, 5)[:, ::2]
    decoded, _ = wire.decode(wire.encode({"x": value}))
    assert decoded["x"].dtype == np.dtype("<f4")
    np.testing.assert_array_equal(decoded["x"], value)


def test_views_are_read_only_unless_asked_for_writable_copies() -> None:
    body = wire.encode({"x": np.ones(4, np.float32)})
    assert not wire.decode(body)[0]["x"].flags.writeable
    writable = wire.decode(body, writable=True)[0]["x"]
    writable[0] = 7.0  # torch.as_tensor wants writable arrays
    assert writable[0] == 7.0


def test_unsendable_dtypes_are_refused_when_encoding() -> None:
    with pytest.raises(wire.WireError, match="cannot be sent"):
        wire.encode({"x": np.array(["a"])})


def _with_header(header: object, data: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    text += b" " * ((-(8 + len(text))) % 8)
    return wire.MAGIC + struct.pack("<I", len(text)) + text + data


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"MWB", "shorter than"),
        (b"NOPE" + struct.pack("<I", 0), "does not start with"),
        (wire.MAGIC + struct.pack("<I", 10**9), "exceeds"),
        (wire.MAGIC + struct.pack("<I", 100) + b"{}", "body ends first"),
        (wire.MAGIC + struct.pack("<I", 4) + b"\xff\xfe{}", "not valid UTF-8 JSON"),
        (_with_header([1, 2]), "must be a JSON object"),
        (_with_header({"arrays": "obs"}), "must be a list"),
        (_with_header({"arrays": [], "meta": 3}), "'meta' must be"),
        (_with_header({"arrays": [5]}), "must be an object"),
        (_with_header({"arrays": [{"name": "", "dtype": "<f4", "shape": [1]}]}), "name must be"),
        (
            _with_header({"arrays": [{"name": "x", "dtype": ">f4", "shape": [1]}]}, b"\0" * 8),
            "dtype",
        ),
        (
            _with_header({"arrays": [{"name": "x", "dtype": "|O", "shape": [1]}]}, b"\0" * 8),
            "dtype",
        ),
        (_with_header({"arrays": [{"name": "x", "dtype": "<f4", "shape": [-1]}]}), "shape must be"),
        (
            _with_header({"arrays": [{"name": "x", "dtype": "<f4", "shape": [True]}]}),
            "shape must be",
        ),
        (
            _with_header({"arrays": [{"name": "x", "dtype": "<f4", "shape": [1, 1, 1, 1, 1]}]}),
            "shape must be",
        ),
        (
            _with_header({"arrays": [{"name": "x", "dtype": "<f4", "shape": [4]}]}, b"\0" * 8),
            "remain",
        ),
        (
            _with_header({"arrays": [{"name": "x", "dtype": "<f4", "shape": [10**12, 10**12]}]}),
            "remain",
        ),
        (
            _with_header({"arrays": [{"name": "x", "dtype": "<f4", "shape": [2]}] * 2}, b"\0" * 16),
            "twice",
        ),
        (_with_header({"arrays": []}, b"\0" * 8), "unexpected bytes"),
    ],
)
def test_malformed_bodies_raise_wire_errors_that_say_why(body: bytes, message: str) -> None:
    with pytest.raises(wire.WireError, match=message):
        wire.decode(body)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_arbitrary_bytes_never_raise_anything_but_wire_error(body: bytes) -> None:
    try:
        wire.decode(body)
    except wire.WireError:
        pass


@settings(max_examples=100, deadline=None)
@given(
    st.dictionaries(
        st.text(st.characters(codec="ascii", categories=["L", "N"]), min_size=1, max_size=8),
        st.sampled_from(DTYPES).flatmap(
            lambda dtype: hnp.arrays(dtype, hnp.array_shapes(min_dims=0, max_dims=3, max_side=4))
        ),
        max_size=4,
    )
)
def test_any_allowed_arrays_round_trip(arrays: dict[str, np.ndarray]) -> None:
    decoded, _ = wire.decode(wire.encode(arrays))
    assert set(decoded) == set(arrays)
    for name, value in arrays.items():
        np.testing.assert_array_equal(decoded[name], value)
        assert decoded[name].dtype == value.dtype and decoded[name].shape == value.shape
