"""Verification of a whole checkpoint (``ckptstore fsck``): names every damaged
tensor and chunk instead of stopping at the first."""
from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass

from ckptstore import manifest as fmt
from ckptstore.errors import CheckpointNotFoundError, CkptError, CorruptCheckpointError
from ckptstore.manifest.io import read_manifest
from ckptstore.pipeline.codec import decode_planes, hash_bytes
from ckptstore.storage import Storage, open_storage
from ckptstore.storage.base import linked


@dataclass(frozen=True, slots=True)
class Damage:
    """One problem: ``tensor``/``chunk`` are None when it is not about one chunk."""

    file: str | None
    tensor: str | None
    chunk: int | None
    problem: str

    def __str__(self) -> str:
        where = []
        if self.tensor is not None:
            where.append(f"tensor {self.tensor!r}")
        if self.chunk is not None:
            where.append(f"chunk {self.chunk}")
        if self.file is not None:
            where.append(f"in {self.file}")
        return (" ".join(where) + ": " if where else "") + self.problem


def _structure(m: fmt.Manifest) -> list[Damage]:
    """What ``load`` would refuse before reading data: unknown or unsafe dtypes,
    sizes that do not fit the shape, a state tree naming missing tensors."""
    from ckptstore.plan.tree import safe_numpy_dtype, torch_dtype, unflatten

    damage = []
    for t in m.tensors:
        try:
            itemsize = (torch_dtype(t.dtype).itemsize if t.kind == "torch"
                        else safe_numpy_dtype(t.dtype).itemsize)
            if math.prod(t.shape) * itemsize != t.nbytes:
                raise CorruptCheckpointError(f"{t.nbytes} bytes do not fit shape "
                                             f"{list(t.shape)} of {t.dtype}")
        except CkptError as e:
            damage.append(Damage(fmt.MANIFEST_NAME, t.name, None, str(e)))

    def leaf(kind: str, i: object) -> None:
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(m.tensors):
            raise CorruptCheckpointError(f"state tree refers to tensor {i!r}, which does not exist")
        if m.tensors[i].kind != ("torch" if kind == "tensor" else "numpy"):
            raise CorruptCheckpointError(f"state tree expects another kind of array for tensor {i}")

    try:
        unflatten(m.tree, leaf)
    except CkptError as e:
        damage.append(Damage(fmt.MANIFEST_NAME, None, None, f"state tree: {e}"))
    return damage


@dataclass(frozen=True, slots=True)
class FsckReport:
    path: str
    ok: bool
    tensors: int
    chunks: int
    files: int
    bytes_checked: int
    damage: tuple

    def to_json(self) -> dict:
        d = asdict(self)
        d["damage"] = [asdict(x) for x in self.damage]
        d["damaged_tensors"] = sorted({x.tensor for x in self.damage if x.tensor is not None})
        return d


def fsck(path: "str | os.PathLike | Storage", *, deep: bool = False,
         progress: Callable[[int], None] | None = None,
         storage_options: dict | None = None) -> FsckReport:
    """Check the manifest, every file's presence, size and header, and every chunk's
    hash (``deep``: also decode and check the raw hash). ``path`` is a local path,
    an fsspec URL or a Storage. Raises CheckpointNotFoundError when there is no
    manifest at all."""
    storage = open_storage(path, storage_options)
    damage: list[Damage] = []
    try:
        m = read_manifest(storage)
    except CheckpointNotFoundError:
        raise
    except CorruptCheckpointError as e:
        return FsckReport(storage.url, False, 0, 0, 0, 0,
                          (Damage(fmt.MANIFEST_NAME, None, None, f"manifest is damaged: {e}"),))
    damage.extend(_structure(m))
    storage = linked(storage, m.files)  # incremental saves name older steps' files
    sizes: dict[str, int | None] = {}
    for f in m.files:
        try:
            sizes[f.name] = storage.size(f.name)
        except FileNotFoundError:
            sizes[f.name] = None
            damage.append(Damage(f.name, None, None, "file is missing"))
            continue
        if sizes[f.name] != f.size:
            damage.append(Damage(f.name, None, None,
                                 f"file is {sizes[f.name]} bytes, the manifest says {f.size}"))
        if f.header_length:
            head = storage.read(f.name, 0, f.header_length)
            if hash_bytes(head) != f.header_hash:
                damage.append(Damage(f.name, None, None, "safetensors header is damaged"))
    checked = 0
    nchunks = 0
    for t in m.tensors:
        for i, c in enumerate(t.chunks):
            nchunks += 1
            if sizes.get(c.file) is None:
                damage.append(Damage(c.file, t.name, i, "its file is missing"))
                continue
            data = storage.read(c.file, c.offset, c.length)
            checked += len(data)
            if progress is not None:
                progress(len(data))
            if len(data) != c.length:
                damage.append(Damage(c.file, t.name, i,
                                     f"truncated: {len(data)} of {c.length} bytes present"))
            elif hash_bytes(data) != c.hash:
                damage.append(Damage(c.file, t.name, i, "hash mismatch"))
            elif deep and c.hash != c.raw_hash:
                out = bytearray(c.raw_length)
                try:
                    decode_planes(memoryview(data), list(c.planes), c.group, memoryview(out))
                    if hash_bytes(out) != c.raw_hash:
                        damage.append(Damage(c.file, t.name, i, "decoded bytes do not match"))
                except CorruptCheckpointError as e:
                    damage.append(Damage(c.file, t.name, i, f"does not decode: {e}"))
    return FsckReport(storage.url, not damage, len(m.tensors), nchunks, len(m.files), checked,
                      tuple(damage))
