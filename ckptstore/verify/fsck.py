"""Verification of a whole checkpoint (``ckptstore fsck``): names every damaged
tensor and chunk instead of stopping at the first (checks: :mod:`.checks`)."""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass

from ckptstore import manifest as fmt
from ckptstore.errors import CheckpointNotFoundError, CorruptCheckpointError, UnsafeCheckpointError
from ckptstore.storage import Storage, open_storage
from ckptstore.verify.checks import Damage, Verifier

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


def fsck(path: "str | os.PathLike | Storage", *, deep: bool = False,
         progress: Callable[[int], None] | None = None,
         storage_options: dict | None = None) -> FsckReport:
    """Check the manifest, every file's presence, size and header, and every chunk's
    hash (``deep``: also decode and check the raw hash). ``path`` is a local path,
    an fsspec URL or a Storage. Raises CheckpointNotFoundError when there is no
    manifest at all."""
    storage = open_storage(path, storage_options)
    try:
        v = Verifier(storage)
    except CheckpointNotFoundError:
        raise
    except CorruptCheckpointError as e:
        return FsckReport(storage.url, False, 0, 0, 0, 0,
                          (Damage(fmt.MANIFEST_NAME, None, None, f"manifest is damaged: {e}"),))
    try:
        damage = [*v.structure(), *v.files(), *v.chunks(deep=deep, progress=progress)]
    except UnsafeCheckpointError as e:  # e.g. a base that resolves outside the run
        damage = [Damage(fmt.MANIFEST_NAME, None, None, f"unsafe to read: {e}")]
    m = v.manifest
    return FsckReport(v.storage.url, not damage, len(m.tensors), v.chunks_checked, len(m.files),
                      v.bytes_checked, tuple(damage))
