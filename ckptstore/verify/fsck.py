"""Verification of a whole checkpoint (``ckptstore fsck``): names every damaged
tensor and chunk instead of stopping at the first (checks: :mod:`.checks`).

This module imports no torch (``ckptstore fsck`` starts without it): the structure
check below reads dtypes from :mod:`ckptstore.manifest.dtypes` and walks the state
tree as JSON.
"""
from __future__ import annotations

import base64
import binascii
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from ckptstore import manifest as fmt
from ckptstore.errors import CheckpointNotFoundError, CkptError, CorruptCheckpointError, UnsafeCheckpointError
from ckptstore.manifest import ranked
from ckptstore.manifest.dtypes import itemsize, numpy_dtype
from ckptstore.manifest.treetags import VALUE_TAGS, check_value_node
from ckptstore.storage import Storage, open_storage
from ckptstore.verify.checks import Damage, Verifier

#: the state tree's nesting limit (``plan.tree.MAX_DEPTH``, which load enforces)
MAX_DEPTH = 128

__all__ = ["Damage", "FsckReport", "fsck"]


@dataclass(frozen=True, slots=True)
class FsckReport:
    path: str
    ok: bool
    tensors: int
    chunks: int
    files: int
    bytes_checked: int
    damage: tuple[Damage, ...]

    def to_json(self) -> dict:
        d = asdict(self)
        d["damage"] = [asdict(x) for x in self.damage]
        d["damaged_tensors"] = sorted({x.tensor for x in self.damage if x.tensor is not None})
        return d


def _broken_indexes(storage: Storage, m: fmt.Manifest) -> tuple[Damage, ...]:
    """One Damage naming each rank index of the distributed save ``m`` that does not
    read (missing, damaged, inconsistent with the manifest)."""
    damage = []
    for rank, name in enumerate(m.indexes):
        try:
            ranked.read_index(storage, m, rank)
        except CorruptCheckpointError as e:  # UnsafeCheckpointError included
            damage.append(Damage(name, None, None, f"rank {rank}'s index: {e}"))
    return tuple(damage) or (Damage(None, None, None, "the rank indexes do not agree with each "
                                    "other (a file or box listed twice)"),)


def fsck(path: "str | os.PathLike | Storage", *, deep: bool = False,
         progress: Callable[[int], None] | None = None,
         storage_options: dict | None = None) -> FsckReport:
    """Check the manifest, every file's presence, size and header, and every chunk's
    hash (``deep``: also decode and check the raw hash). ``path`` is a local path,
    an fsspec URL or a Storage. Raises CheckpointNotFoundError when there is no
    manifest at all."""
    storage = open_storage(path, storage_options)
    try:
        catalog = fmt.read_catalog(storage)  # read once: a manifest may be large
    except CheckpointNotFoundError:
        raise
    except CorruptCheckpointError as e:  # UnsafeCheckpointError included
        return FsckReport(storage.url, False, 0, 0, 0, 0,
                          (Damage(fmt.MANIFEST_NAME, None, None, f"manifest is damaged: {e}"),))
    try:
        v = Verifier(storage, fmt.resolve(storage, catalog))
    except CorruptCheckpointError:  # a rank index of a distributed save: name each one
        return FsckReport(storage.url, False, len(catalog.tensors), 0, len(catalog.files), 0,
                          _broken_indexes(storage, catalog))
    try:
        damage = [*structure(v.manifest), *v.files(), *v.chunks(deep=deep, progress=progress)]
    except UnsafeCheckpointError as e:  # e.g. a base that resolves outside the run
        damage = [Damage(fmt.MANIFEST_NAME, None, None, f"unsafe to read: {e}")]
    m = v.manifest
    return FsckReport(v.storage.url, not damage, len(m.tensors), v.chunks_checked, len(m.files),
                      v.bytes_checked, tuple(damage))


def structure(m: fmt.Manifest) -> Iterator[Damage]:
    """What ``load`` would refuse before reading data: unknown or unsafe dtypes, sizes
    that do not fit the shape, a state tree that is malformed or names tensors that
    do not exist (the JSON of other tagged values is decoded only by load)."""
    for t in m.tensors:
        try:
            if math.prod(t.shape) * itemsize(t.kind, t.dtype) != t.nbytes:
                raise CorruptCheckpointError(f"{t.nbytes} bytes do not fit shape "
                                             f"{list(t.shape)} of {t.dtype}")
        except CkptError as e:
            yield Damage(fmt.MANIFEST_NAME, t.name, None, str(e))
    try:
        _walk(m.tree, 0, m)
    except CkptError as e:
        yield Damage(fmt.MANIFEST_NAME, None, None, f"state tree: {e}")
    except (KeyError, TypeError, ValueError, binascii.Error) as e:
        yield Damage(fmt.MANIFEST_NAME, None, None, f"state tree: malformed node: {e}")


def _walk(node: Any, depth: int, m: fmt.Manifest) -> None:
    if depth > MAX_DEPTH:
        raise UnsafeCheckpointError(f"state tree nests deeper than {MAX_DEPTH} levels")
    if node is None or isinstance(node, (bool, str, int)):
        return
    if isinstance(node, list):  # the items (or one [key, value] pair) of a node: same depth
        for v in node:
            _walk(v, depth, m)
        return
    if not isinstance(node, dict) or not isinstance(node.get("T"), str):
        raise CorruptCheckpointError(f"malformed tree node: {str(node)[:80]!r}")
    t = node["T"]
    if t in ("tensor", "ndarray"):
        i = node["id"]
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(m.tensors):
            raise CorruptCheckpointError(f"state tree refers to tensor {i!r}, which does not exist")
        if m.tensors[i].kind != ("torch" if t == "tensor" else "numpy"):
            raise CorruptCheckpointError(f"state tree expects another kind of array for tensor {i}")
    elif t == "float":
        float(node["v"])
    elif t == "bytes":
        base64.b64decode(node["b64"], validate=True)
    elif t == "npscalar":
        if len(bytes.fromhex(node["hex"])) != numpy_dtype(node["dtype"]).itemsize:
            raise CorruptCheckpointError("numpy scalar has the wrong number of bytes")
    elif t in ("dict", "odict", "list", "tuple"):
        if not isinstance(node["items"], list):
            raise CorruptCheckpointError(f"malformed {t!r} node: items is not a list")
    elif t == "dtype":
        if not isinstance(node["v"], str):
            raise CorruptCheckpointError("malformed 'dtype' node: v is not a string")
    elif t in VALUE_TAGS:
        check_value_node(t, node)
    else:  # e.g. a "pickle" node: nothing but the tags of the format may appear
        raise CorruptCheckpointError(f"unknown tree node type {t[:40]!r}")
    for k, v in node.items():
        if k != "T" and isinstance(v, (list, dict)):
            _walk(v, depth + 1, m)
