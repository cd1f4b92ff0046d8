"""Cold loads at disk speed: uncompressed tensors read as large extents of their files.

The uncompressed tensors a load wants are grouped, per file, into extents (runs of
tensors whose gaps are small); each extent is read with one
:meth:`ckptstore.storage.base.Storage.read_extent` (O_DIRECT with several requests
in flight on local disks, parallel ranged requests on object stores) into fresh,
page-aligned memory, its chunks are verified there, and its tensors are views of
that memory: no page cache, no second copy. Several extents are read at once by
the reader's threads, so one extent's hashing overlaps the next one's reads.
"""
from __future__ import annotations

import errno
import math
import os
import resource
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ckptstore import manifest as fmt
from ckptstore.errors import CheckpointTooLargeError, CorruptCheckpointError
from ckptstore.plan.tree import safe_numpy_dtype, torch_dtype
from ckptstore.storage import Storage
from ckptstore.verify.checks import check_chunk, chunk_where

GAP = 0  #: bytes of unwanted data read rather than starting a new extent (none: a
#: full load finds its tensors back to back; a partial one reads only what it wants)
MAX_EXTENT = 256 << 20  #: extents are cut at this size so several read in parallel


@dataclass(slots=True)
class Extent:
    """Bytes ``[start, end)`` of one file and the tensors that lie in them."""

    file: str
    start: int
    end: int
    tensors: list[tuple[int, fmt.TensorRecord]] = field(default_factory=list)


def contiguous(rec: fmt.TensorRecord) -> bool:
    """Whether ``rec`` is stored raw, in one file, as one run of bytes that can be
    viewed with its dtype (element-aligned)."""
    if not rec.chunks or rec.nbytes == 0:
        return False
    return raw_run(rec.chunks) == rec.nbytes


def raw_run(chunks: "list[fmt.ChunkRecord] | tuple[fmt.ChunkRecord, ...]") -> int | None:
    """The bytes ``chunks`` hold if they are stored raw, back to back in one file (one
    run a view can cover), else None."""
    c0 = chunks[0]
    pos = c0.offset
    for c in chunks:
        if c.file != c0.file or c.group != 1 or c.planes[0][0] != "raw" or c.offset != pos:
            return None
        if c.length != c.raw_length:
            return None
        pos += c.length
    return pos - c0.offset


def memory_limit() -> int:
    """The most bytes a load may copy into memory: physical memory and swap, or the
    process's address-space limit (``RLIMIT_AS``) where that is lower."""
    try:
        limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") + swap_bytes()
    except (ValueError, OSError):
        limit = fmt.MAX_SIZE
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    return limit if soft in (resource.RLIM_INFINITY, -1) else min(limit, soft)


def swap_bytes() -> int:
    """Total swap space (Linux ``/proc/meminfo``; 0 where it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("SwapTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def too_large(rec: fmt.TensorRecord, why: str) -> CheckpointTooLargeError:
    return CheckpointTooLargeError(
        f"tensor {rec.name!r} ({rec.nbytes} bytes, shape {list(rec.shape)}) {why}: load fewer "
        "keys (keys=...), or map the files instead of copying them (mmap=True)")


def check_memory(recs: list[fmt.TensorRecord]) -> None:
    """Refuse, before allocating, a load whose copied tensors cannot fit in memory."""
    limit = memory_limit()
    total = sum(r.nbytes for r in recs)
    if total > limit:
        big = max(recs, key=lambda r: r.nbytes)
        raise too_large(big, f"is part of {total} bytes to copy, more than the {limit} bytes "
                             "of memory this process can have")


def allocating(rec: fmt.TensorRecord, fn: Callable[[], Any]) -> Any:
    """``fn()``, with the allocator's refusal turned into CheckpointTooLargeError."""
    try:
        return fn()
    except MemoryError:
        raise too_large(rec, "does not fit in memory") from None
    except OSError as e:
        if e.errno != errno.ENOMEM:
            raise
        raise too_large(rec, "does not fit in memory") from None
    except RuntimeError as e:  # torch's allocator: "can't allocate memory"
        if "allocate" not in str(e):
            raise
        raise too_large(rec, "does not fit in memory") from None


def plan_extents(wanted: list[tuple[int, fmt.TensorRecord]]) -> list[Extent]:
    """Group contiguous raw tensors into extents, per file, in file order."""
    by_file: dict[str, list[tuple[int, fmt.TensorRecord]]] = {}
    for i, rec in wanted:
        by_file.setdefault(rec.chunks[0].file, []).append((i, rec))
    out: list[Extent] = []
    for name, items in by_file.items():
        items.sort(key=lambda it: it[1].chunks[0].offset)
        cur: Extent | None = None
        for i, rec in items:
            lo = rec.chunks[0].offset
            hi = lo + rec.nbytes
            if cur is None or lo - cur.end > GAP or hi - cur.start > MAX_EXTENT or lo < cur.end:
                cur = Extent(name, lo, hi)
                out.append(cur)
            cur.end = max(cur.end, hi)
            cur.tensors.append((i, rec))
    return out


def read_extent(storage: Storage, ext: Extent, verify: bool) -> dict[int, Any]:
    """Read one extent, verify its chunks, and return its tensors (views of it)."""
    try:
        view = allocating(ext.tensors[0][1],
                          lambda: storage.read_extent(ext.file, ext.start, ext.end - ext.start))
    except FileNotFoundError:
        i, rec = ext.tensors[0]
        raise CorruptCheckpointError(f"{chunk_where(rec, 0)}: file {ext.file} is missing") from None
    out: dict[int, Any] = {}
    for i, rec in ext.tensors:
        base = rec.chunks[0].offset - ext.start
        for k, c in enumerate(rec.chunks):
            lo = c.offset - ext.start
            # a short extent (truncated file) is caught here: the chunk's length is wrong
            check_chunk(rec, k, view[lo:lo + c.length], verify=verify)
        out[i] = _as_array(rec, view, base)
    return out


def _as_array(rec: fmt.TensorRecord, view: memoryview, offset: int) -> Any:
    """``rec``'s values over ``view[offset:]``: a view where element-aligned, else a copy."""
    n = math.prod(rec.shape)
    if rec.kind == "torch":
        dtype = torch_dtype(rec.dtype)
        if n * dtype.itemsize != rec.nbytes:
            raise CorruptCheckpointError(f"tensor {rec.name!r}: {rec.nbytes} bytes do not fit "
                                         f"shape {list(rec.shape)} of {rec.dtype}")
        if offset % dtype.itemsize == 0:
            return torch.frombuffer(view, dtype=dtype, count=n, offset=offset).view(rec.shape)
        raw = torch.frombuffer(view, dtype=torch.uint8, count=rec.nbytes, offset=offset)
        return raw.clone().view(dtype).view(rec.shape)
    dt = safe_numpy_dtype(rec.dtype)
    if n * dt.itemsize != rec.nbytes:
        raise CorruptCheckpointError(f"array {rec.name!r}: {rec.nbytes} bytes do not fit "
                                     f"shape {list(rec.shape)} of {rec.dtype}")
    arr = np.frombuffer(view, dtype=np.uint8, count=rec.nbytes, offset=offset)
    if offset % max(dt.itemsize, 1):
        arr = arr.copy()
    return arr.view(dt).reshape(rec.shape)
