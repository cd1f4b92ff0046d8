"""Element sizes of the dtypes a manifest may name, without importing torch.

``fsck`` checks that every tensor's byte count fits its shape from these; the load
path rebuilds real dtypes in :mod:`ckptstore.plan.tree` (``torch_dtype``,
``safe_numpy_dtype``), which imports torch.
"""
from __future__ import annotations

import re

import numpy as np

from ckptstore.errors import UnsafeCheckpointError
from ckptstore.manifest.records import TORCH_DTYPES

#: bytes per element of every torch dtype a manifest may name (``TORCH_DTYPES``)
TORCH_ITEMSIZE: dict[str, int] = {
    "bool": 1, "uint8": 1, "uint16": 2, "uint32": 4, "uint64": 8, "int8": 1, "int16": 2,
    "int32": 4, "int64": 8, "float16": 2, "bfloat16": 2, "float32": 4, "float64": 8,
    "complex32": 4, "complex64": 8, "complex128": 16, "float8_e4m3fn": 1, "float8_e5m2": 1,
    "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1, "float8_e8m0fnu": 1,
}
assert set(TORCH_ITEMSIZE) == set(TORCH_DTYPES), "TORCH_ITEMSIZE must name every TORCH_DTYPES entry"

_NP_DTYPE_RE = re.compile(r"^[<>|=]?[biufcmMSU]\d{1,3}(\[[a-zA-Z]{1,3}\])?$")


def numpy_dtype(s: str) -> np.dtype:
    """Parse a numpy dtype string, allowing only plain, object-free dtypes (the one rule:
    ``plan.tree.safe_numpy_dtype`` calls this)."""
    if not isinstance(s, str) or not _NP_DTYPE_RE.match(s):
        raise UnsafeCheckpointError(f"numpy dtype {s!r} is not allowed in a checkpoint")
    try:
        dt = np.dtype(s)
    except (TypeError, ValueError):  # e.g. "<i3": the right shape, not a real dtype
        raise UnsafeCheckpointError(f"numpy dtype {s!r} is not a numpy dtype") from None
    if dt.hasobject:
        raise UnsafeCheckpointError(f"numpy dtype {s!r} holds Python objects")
    return dt


def itemsize(kind: str, dtype: str) -> int:
    """Bytes per element of a tensor record's dtype (``kind`` "torch" or "numpy")."""
    if kind == "torch":
        if dtype not in TORCH_ITEMSIZE:
            raise UnsafeCheckpointError(f"unknown torch dtype {dtype!r}; it may need a newer ckptstore")
        return TORCH_ITEMSIZE[dtype]
    return numpy_dtype(dtype).itemsize
