"""Reading checkpoints: verified chunk reads, tensors (the manifest: ckptstore.manifest.io)."""
from __future__ import annotations

import concurrent.futures as cf
import errno
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ckptstore import manifest as fmt
from ckptstore.errors import CorruptCheckpointError
from ckptstore.plan.tree import safe_numpy_dtype, torch_dtype
from ckptstore.read import extents
from ckptstore.read.alloc import host_empty
from ckptstore.storage import Storage
from ckptstore.storage.base import linked
from ckptstore.verify.checks import check_chunk, check_files, chunk_where, decode_chunk

READ_THREADS = 4
WARM = 0.9  #: probed fraction of a file in the page cache above which it is mapped


def empty_like_record(rec: fmt.TensorRecord) -> tuple[Any, memoryview]:
    """Allocate the output array for ``rec`` and a byte view of it."""
    return extents.allocating(rec, functools.partial(_empty_like_record, rec))


def _empty_like_record(rec: fmt.TensorRecord) -> tuple[Any, memoryview]:
    if rec.kind == "torch":
        dtype = torch_dtype(rec.dtype)
        if math.prod(rec.shape) * dtype.itemsize != rec.nbytes:
            raise CorruptCheckpointError(f"tensor {rec.name!r}: {rec.nbytes} bytes do not fit "
                                         f"shape {list(rec.shape)} of {rec.dtype}")
        out = host_empty(rec.shape, dtype)
        if rec.nbytes == 0:
            return out, memoryview(bytearray(0))
        raw = torch.empty(0, dtype=torch.uint8).set_(out.untyped_storage(), 0, (rec.nbytes,), (1,))
        return out, raw.numpy().data
    dt = safe_numpy_dtype(rec.dtype)
    if math.prod(rec.shape) * dt.itemsize != rec.nbytes:
        raise CorruptCheckpointError(f"array {rec.name!r}: {rec.nbytes} bytes do not fit "
                                     f"shape {list(rec.shape)} of {rec.dtype}")
    arr = np.empty(rec.shape, dtype=dt)
    return arr, arr.reshape(-1).view(np.uint8).data


def read_chunk(storage: Storage, rec: fmt.TensorRecord, index: int, out: memoryview | Mapped,
               verify: bool) -> None:
    """Read chunk ``index`` of ``rec`` into ``out`` (its raw bytes), verifying hashes
    (:mod:`ckptstore.verify.checks`). An ``out`` of type :class:`Mapped` already
    holds the stored bytes: only verified."""
    c = rec.chunks[index]
    if isinstance(out, Mapped):
        check_chunk(rec, index, out.view, verify=verify)
        return
    try:
        if c.group == 1 and c.planes[0][0] == "raw":
            n = storage.readinto(c.file, c.offset, out)
            check_chunk(rec, index, out[:n], verify=verify)
            return
        data = storage.read(c.file, c.offset, c.length)
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{chunk_where(rec, index)}: file {c.file} is missing") from None
    check_chunk(rec, index, data, verify=verify)
    decode_chunk(rec, index, data, out, verify=verify)


def read_tensors(storage: Storage, manifest: fmt.Manifest, *, verify: bool = True,
                 select: Callable[[fmt.TensorRecord], bool] | None = None,
                 threads: int = READ_THREADS, mmap: bool | None = None) -> dict[int, Any]:
    """Read (the selected) tensors; returns {tensor index: tensor or ndarray}.

    Uncompressed tensors are either read as large extents into fresh memory
    (:mod:`ckptstore.read.extents`: O_DIRECT, several requests in flight; the
    cold-cache path) or, with ``mmap``, mapped copy-on-write from local files (no
    copy out of the page cache: the warm-cache path). ``mmap=None`` picks the map
    only where the files are already in the page cache. Chunk hashes are verified
    either way. Compressed tensors are read and decoded chunk by chunk in threads."""
    storage = linked(storage, manifest.files)  # incremental saves name older steps' files
    wanted = [(i, r) for i, r in enumerate(manifest.tensors) if select is None or select(r)]
    outs: dict[int, Any] = {}
    jobs: list[tuple[fmt.TensorRecord, int, memoryview | None]] = []
    # present at their recorded sizes (which bound every chunk) before allocating
    check_files(storage, manifest, {c.file for _, r in wanted for c in r.chunks}, headers=verify)
    if mmap is None:
        mmap = cached(storage, {r.chunks[0].file for _, r in wanted if extents.contiguous(r)})
    maps = FileMaps(storage, manifest) if mmap else None
    whole: list[tuple[int, fmt.TensorRecord]] = []
    copied: list[tuple[int, fmt.TensorRecord]] = []
    for i, rec in wanted:
        mapped = maps.tensor(rec) if maps is not None else None
        if mapped is not None:
            outs[i] = mapped
            if verify:
                jobs.extend((rec, k, None) for k in range(len(rec.chunks)))
        elif maps is None and extents.contiguous(rec):
            whole.append((i, rec))
        else:
            copied.append((i, rec))
    extents.check_memory([r for _, r in whole + copied])
    for i, rec in copied:
        arr, raw = empty_like_record(rec)
        outs[i] = arr
        pos = 0
        for k, c in enumerate(rec.chunks):
            jobs.append((rec, k, raw[pos:pos + c.raw_length]))
            pos += c.raw_length
    # a mapped tensor's chunks (view None) are verified in place, in the mapped file
    ready: list[tuple[fmt.TensorRecord, int, memoryview | Mapped]] = [
        (rec, k, view if view is not None else _mapped(maps, rec, k)) for rec, k, view in jobs]
    work: list[Callable[[], Any]] = [
        functools.partial(extents.read_extent, storage, e, verify)
        for e in extents.plan_extents(whole)]
    work += [functools.partial(read_chunk, storage, rec, k, out, verify) for rec, k, out in ready]
    for r in _run(work, threads):
        if isinstance(r, dict):  # an extent's tensors
            outs.update(r)
    return outs


def _run(work: list[Callable[[], Any]], threads: int) -> list[Any]:
    """Every job's result, in order, on up to ``threads`` threads. The first error
    cancels the jobs not started yet: a damaged chunk of a huge claimed tensor does
    not go on to fill the rest of it."""
    if threads <= 1 or len(work) <= 1:
        return [fn() for fn in work]
    with cf.ThreadPoolExecutor(min(threads, len(work)), thread_name_prefix="ckptstore-read") as ex:
        futures = [ex.submit(fn) for fn in work]
        cf.wait(futures, return_when=cf.FIRST_EXCEPTION)
        if any(f.done() and not f.cancelled() and f.exception() is not None for f in futures):
            for f in futures:
                f.cancel()
            cf.wait(futures)  # the ones running finish (they write into our buffers)
            for f in futures:  # the first error in job order, as without cancelling
                if not f.cancelled() and f.exception() is not None:
                    raise f.exception()  # type: ignore[misc]
        return [f.result() for f in futures]


def cached(storage: Storage, names: set[str]) -> bool:
    """Whether every file in ``names`` is (as far as a few probes tell) in the page
    cache, so that mapping it beats reading it again from the device."""
    if not names or not storage.capabilities.local_path:
        return False
    for name in names:
        try:
            frac = storage.cached_fraction(name)
        except OSError:
            return False
        if frac is None or frac < WARM:
            return False
    return True


@dataclass(frozen=True, slots=True)
class Mapped:
    """Stored bytes of a chunk, already in place in a mapped tensor."""

    view: memoryview


class FileMaps:
    """Copy-on-write maps of a checkpoint's local data files, one per file."""

    def __init__(self, storage: Storage, manifest: fmt.Manifest) -> None:
        self.storage = storage
        self.sizes = {f.name: f.size for f in manifest.files}
        self.maps: dict[str, Any] = {}

    def _map(self, name: str) -> Any:
        if name not in self.maps:
            try:
                mm = self.storage.map_file(name)
            except FileNotFoundError:  # the read path names the missing file, typed
                mm = None
            except OSError as e:  # no address space for it (ENOMEM): read it instead
                if e.errno != errno.ENOMEM:
                    raise
                mm = None
            # never map past the end: a shorter file would raise SIGBUS on access
            self.maps[name] = mm if mm is not None and len(mm) == self.sizes.get(name) else None
        return self.maps[name]

    def tensor(self, rec: fmt.TensorRecord) -> "torch.Tensor | None":
        """``rec`` as a tensor over its mapped file, or None if it must be read."""
        if rec.kind != "torch" or not extents.contiguous(rec):
            return None
        return self.run(rec, list(range(len(rec.chunks))), torch_dtype(rec.dtype), tuple(rec.shape))

    def run(self, rec: fmt.TensorRecord, ks: list[int], dtype: "torch.dtype", shape: tuple
            ) -> "torch.Tensor | None":
        """Chunks ``ks`` of ``rec`` (stored raw, back to back in one file) as a tensor of
        ``shape`` over the mapped file, or None where they are not so stored, do not
        hold exactly ``shape`` or are misaligned for ``dtype`` (then they are read)."""
        cs = [rec.chunks[k] for k in ks]
        n = extents.raw_run(cs) if self.storage.capabilities.local_path else None
        if (n is None or n == 0 or n != math.prod(shape) * dtype.itemsize
                or cs[0].offset % max(dtype.itemsize, 1)):
            return None
        mm = self._map(cs[0].file)
        if mm is None or cs[0].offset + n > len(mm):
            return None
        # its own storage starting at the tensor (some torch APIs, e.g. set_rng_state,
        # read a tensor's storage from its start and ignore the view offset)
        return torch.frombuffer(mm, dtype=torch.uint8, count=n, offset=cs[0].offset
                                ).view(dtype).view(shape)

    def chunk_view(self, rec: fmt.TensorRecord, index: int) -> Mapped:
        c = rec.chunks[index]
        return Mapped(memoryview(self.maps[c.file])[c.offset:c.offset + c.length])


def _mapped(maps: FileMaps | None, rec: fmt.TensorRecord, index: int) -> Mapped:
    assert maps is not None  # chunks without an output buffer belong to mapped tensors
    return maps.chunk_view(rec, index)
