"""The options of one save, checked once before anything is staged or written."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

from ckptstore.errors import UnsupportedTypeError
from ckptstore.pipeline.codec import CHUNK_LIMIT_ENV, max_coded_chunk
from ckptstore.storage.base import Storage, wrapped_storages

COMPRESSION = ("auto", "zstd", "lz4", "none")
DEFAULT_CHUNK = 16 << 20
DEFAULT_SHARD = 64 << 20  # small enough that writers start while later shards stage
PAGE = 4096


@dataclass(frozen=True, slots=True)
class SaveOptions:
    """How a save lays out, encodes and commits its bytes (see :func:`ckptstore.save`)."""

    compression: str = "auto"
    zstd_level: int = 1
    byte_grouping: bool = True
    staging_budget: int | None = None
    chunk_size: int = DEFAULT_CHUNK
    shard_size: int = DEFAULT_SHARD
    if_busy: str = "wait"
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.compression not in COMPRESSION:
            raise ValueError(f"compression must be one of {COMPRESSION}, not {self.compression!r}")
        if self.if_busy not in ("wait", "raise"):
            raise ValueError(f"if_busy must be 'wait' or 'raise', not {self.if_busy!r}")
        if self.chunk_size <= 0 or self.chunk_size % 64:
            raise ValueError("chunk_size must be a positive multiple of 64")
        if self.compression in ("zstd", "lz4") and self.chunk_size > max_coded_chunk():
            raise ValueError(f"chunk_size ({self.chunk_size}) is over the {max_coded_chunk()}-byte limit "
                             f"of a compressed chunk that loads decode ({CHUNK_LIMIT_ENV}); use a "
                             "smaller chunk_size or compression='none'")
        if self.shard_size < self.chunk_size:
            raise ValueError(f"shard_size ({self.shard_size}) must be at least chunk_size "
                             f"({self.chunk_size}): a file holds whole chunks")

    def for_storage(self, storage: Storage) -> "SaveOptions":
        """These options with ``compression="auto"`` decided for ``storage``."""
        if self.compression != "auto":
            return self
        return dataclasses.replace(self, compression=auto_compression(storage))

    @property
    def codec(self) -> str:
        """The chunk codec: ``raw`` for uncompressed (plain safetensors) files."""
        if self.compression == "auto":
            raise RuntimeError("compression='auto' must be decided for a storage first "
                               "(SaveOptions.for_storage)")
        return "raw" if self.compression == "none" else self.compression

    @property
    def file_size(self) -> int:
        """Target file size: with a staging budget, two files in flight fit in it."""
        if self.staging_budget is None:
            return self.shard_size
        return max(self.chunk_size, min(self.shard_size, int(self.staging_budget) // 2))

    def staging_capacity(self, file_sizes: list[int]) -> int:
        """Staging bytes for files of these sizes: all of them, or the budget (at
        least the largest file, which must fit whole)."""
        need = sum(-(-n // PAGE) * PAGE for n in file_sizes)
        if self.staging_budget is not None:
            need = min(need, max(int(self.staging_budget), max(file_sizes, default=0)))
        return max(need, PAGE)


def auto_compression(storage: Storage) -> str:
    """What ``compression="auto"`` means for ``storage``: ``"none"`` on local file
    systems, where direct writes outrun the codec (3.4 GB/s against about 1 GB/s
    per core: docs/benchmarks.md), and byte-grouped ``"zstd"`` on object stores,
    where every byte saved is upload time saved. ``CKPTSTORE_AUTO_COMPRESSION``
    (a codec name) overrides it, e.g. for a slow network file system."""
    env = os.environ.get("CKPTSTORE_AUTO_COMPRESSION", "").strip()
    if env:
        if env not in COMPRESSION or env == "auto":
            raise ValueError(f"CKPTSTORE_AUTO_COMPRESSION must be one of zstd, lz4, none, "
                             f"not {env!r}")
        return env
    return "none" if storage.capabilities.local_path else "zstd"


def check_metadata(metadata: Any) -> None:
    """Refuse user metadata that is not plain JSON, before anything is staged."""
    try:
        json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise UnsupportedTypeError(f"metadata must be plain JSON: {e}") from None


def check_importable(storage: Storage) -> None:
    """Refuse a Storage (or a Storage it wraps) whose class is defined in ``__main__``:
    writer processes are spawned without re-running the caller's script, so they
    could not unpickle it and would die with the cause only on their stderr."""
    for obj in wrapped_storages(storage):
        cls = type(obj)
        if cls.__module__ == "__main__":
            raise UnsupportedTypeError(
                f"storage class {cls.__qualname__} is defined in __main__; writer processes "
                "do not run the calling script, so they cannot load it: define it in an "
                "importable module")
