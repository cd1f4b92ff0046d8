"""Compare two checkpoints: by the content hashes in their manifests (no tensor
data is read), or with ``deep=True`` by reading and comparing the data."""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ckptstore.read.lazy import TensorInfo, open as open_lazy

HASH_NOTE = ("tensors compared by the content hashes in the two manifests (no tensor data read); "
             "--deep reads and compares the data")
DEEP_NOTE = "tensors compared by reading their data (--deep)"


@dataclass(frozen=True, slots=True)
class DiffReport:
    """Keys added in B, removed from A, changed between them; ``same`` counts the rest."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[tuple[str, str], ...] = ()  #: (name, why) pairs
    same: int = 0
    deep: bool = False  #: the data of every tensor pair of equal type was read and compared
    read: int = 0  #: tensor pairs whose data was read (deep, or chunk sizes differ)

    @property
    def method(self) -> str:
        """How tensors were compared, in words (also in ``to_json()["compared_by"]``)."""
        if self.deep:
            return DEEP_NOTE
        extra = f"; {self.read} read because the chunk sizes differ" if self.read else ""
        return HASH_NOTE + extra

    @property
    def identical(self) -> bool:
        return not (self.added or self.removed or self.changed)

    def to_json(self) -> dict:
        return {"identical": self.identical, "added": list(self.added),
                "removed": list(self.removed),
                "changed": [{"name": n, "why": w} for n, w in self.changed], "same": self.same,
                "compared_by": "data" if self.deep else "manifest content hashes",
                "tensors_read": self.read, "note": self.method}


def diff(a: "str | os.PathLike", b: "str | os.PathLike", *, verify: bool = True,
         deep: bool = False, storage_options: dict | None = None,
         progress: Callable[[int], None] | None = None) -> DiffReport:
    """Compare checkpoints ``a`` and ``b`` leaf by leaf.

    Tensors compare by kind, dtype, shape and content digest from the manifests (no
    data is read). The digest depends on the chunk size, so when the two were saved
    with different chunk sizes tensors of equal type are read and compared byte for
    byte; ``deep=True`` reads and compares every pair of equal type.
    ``progress(nbytes)`` is called per tensor of A compared.
    """
    ca = open_lazy(a, verify=verify, storage_options=storage_options)
    cb = open_lazy(b, verify=verify, storage_options=storage_options)
    va, vb = ca.values_skeleton(), cb.values_skeleton()
    same_chunking = ca.manifest.chunk_size == cb.manifest.chunk_size
    added = tuple(n for n in vb if n not in va)
    removed = tuple(n for n in va if n not in vb)
    changed = []
    same = read = 0
    for name in va:
        if name not in vb:
            continue
        x, y = va[name], vb[name]
        if isinstance(x, TensorInfo) and isinstance(y, TensorInfo):
            why = _tensor_diff(x, y)
            if why is None and (deep or (x.digest != y.digest and not same_chunking)):
                read += 1
                if not _same_bytes(ca[name], cb[name]):
                    why = "content differs"
            elif why is None and x.digest != y.digest:
                why = "content differs"
            if progress is not None:
                progress(x.nbytes)
        elif isinstance(x, TensorInfo) or isinstance(y, TensorInfo):
            why = f"{_kind(x)} in A, {_kind(y)} in B"
        else:
            why = None if _same_value(x, y) else f"{_short(x)} -> {_short(y)}"
        if why:
            changed.append((name, why))
        else:
            same += 1
    return DiffReport(added, removed, tuple(changed), same, deep, read)


def _tensor_diff(x: TensorInfo, y: TensorInfo) -> str | None:
    if x.kind != y.kind:
        return f"{x.kind} array in A, {y.kind} array in B"
    if x.dtype != y.dtype:
        return f"dtype {x.dtype} -> {y.dtype}"
    if tuple(x.shape) != tuple(y.shape):
        return f"shape {list(x.shape)} -> {list(y.shape)}"
    return None


def _same_bytes(x: Any, y: Any) -> bool:
    if isinstance(x, torch.Tensor):
        x, y = x.contiguous().view(-1).view(torch.uint8), y.contiguous().view(-1).view(torch.uint8)
        return bool(torch.equal(x, y))
    return np.ascontiguousarray(x).tobytes() == np.ascontiguousarray(y).tobytes()


def _same_value(x: Any, y: Any) -> bool:
    if type(x) is not type(y):
        return False
    if isinstance(x, np.generic):
        return x.dtype == y.dtype and x.tobytes() == y.tobytes()
    if isinstance(x, float):
        return x == y or (x != x and y != y)
    return bool(x == y)


def _kind(v: Any) -> str:
    return f"a {v.kind} array" if isinstance(v, TensorInfo) else f"a {type(v).__name__}"


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


__all__ = ["DiffReport", "diff"]
