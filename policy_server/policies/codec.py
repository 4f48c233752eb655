"""Weights as JSON: each array as its dtype, shape and little-endian bytes in base64."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np


def encode_weights(weights: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, array in weights.items():
        le = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        out[name] = {
            "dtype": array.dtype.name,
            "shape": list(array.shape),
            "data": base64.b64encode(le.tobytes()).decode("ascii"),
        }
    return out


def decode_weights(encoded: dict[str, dict[str, Any]]) -> dict[str, np.ndarray]:
    """The inverse of ``encode_weights``; raises ValueError when a size does not match its shape."""
    out = {}
    for name, entry in encoded.items():
        dtype = np.dtype(entry["dtype"]).newbyteorder("<")
        flat = np.frombuffer(base64.b64decode(entry["data"]), dtype=dtype)
        shape = tuple(int(d) for d in entry["shape"])
        if flat.size != int(np.prod(shape)):
            raise ValueError(f"weights {name!r}: {flat.size} values for shape {list(shape)}")
        out[name] = flat.reshape(shape).astype(dtype.newbyteorder("="))
    return out
