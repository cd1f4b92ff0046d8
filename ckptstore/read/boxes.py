"""Reading boxes of tensors: any block of a tensor, from the chunks that hold it.

A box read intersects the wanted box with every stored shard of the tensor (a tensor
saved whole is one shard); for each overlap it reads the rows of that shard the overlap
spans (a contiguous byte range of the shard, so chunk-granular and row-aligned),
verifies each chunk's hash, and copies the overlap into place. Resharded loads read
each rank's own box this way, and whole tensors of a distributed save are one box.
A distributed save's rank indexes holding the boxes are read first
(:func:`ckptstore.manifest.resolve`).
"""
from __future__ import annotations

import concurrent.futures as cf
import itertools
import math

import torch

from ckptstore import manifest as fmt
from ckptstore.errors import CorruptCheckpointError
from ckptstore.plan.tree import torch_dtype
from ckptstore.read.alloc import host_bytes, host_empty
from ckptstore.read.reader import READ_THREADS, read_chunk
from ckptstore.storage import Storage
from ckptstore.storage.base import linked
from ckptstore.verify.checks import check_files


def whole_shards(rec: fmt.TensorRecord) -> tuple:
    """A record's shards; an unsharded tensor is one shard covering it. A tensor of a
    distributed save not resolved yet gives its grid's cells (``nchunks`` 0)."""
    if not rec.resolved and rec.grid is not None:
        starts = [rec.grid.starts(d) for d in range(len(rec.shape))]
        return tuple(fmt.ShardRecord(tuple(starts[d][k] for d, k in enumerate(cell)),
                                     tuple(rec.grid.cuts[d][k] for d, k in enumerate(cell)), 0)
                     for cell in itertools.product(*(range(len(c)) for c in rec.grid.cuts)))
    return rec.shards or (fmt.ShardRecord((0,) * len(rec.shape), tuple(rec.shape),
                                          len(rec.chunks)),)


class BoxRead:
    """Plan the chunk reads of one box of one tensor, then assemble it.

    ``jobs`` are ``(record, chunk index, byte view)`` to run (in any order, in
    parallel); ``finish()`` returns the box as a tensor of shape ``sizes``.
    """

    def __init__(self, rec: fmt.TensorRecord, offsets: tuple, sizes: tuple) -> None:
        self.rec, self.offsets, self.sizes = rec, tuple(offsets), tuple(sizes)
        self.dtype = torch_dtype(rec.dtype)
        itemsize = self.dtype.itemsize
        if math.prod(rec.shape) * itemsize != rec.nbytes:
            raise CorruptCheckpointError(f"tensor {rec.name!r}: {rec.nbytes} bytes do not fit "
                                         f"shape {list(rec.shape)} of {rec.dtype}")
        if len(self.offsets) != len(rec.shape) or any(
                o < 0 or o + n > d for o, n, d in zip(self.offsets, self.sizes, rec.shape)):
            raise ValueError(f"box {self.offsets}+{self.sizes} is outside tensor {rec.name!r} "
                             f"of shape {list(rec.shape)}")
        self.out = host_empty(self.sizes, self.dtype)
        self.jobs: list[tuple] = []
        self._parts: list[tuple] = []
        if self.out.numel() == 0:
            return
        self._bytes = self.out.view(-1).view(torch.uint8).numpy().data
        first = 0
        for h in whole_shards(rec):
            lo = [max(o, so) for o, so in zip(self.offsets, h.offsets)]
            hi = [min(o + n, so + sn) for o, n, so, sn in
                  zip(self.offsets, self.sizes, h.offsets, h.shape)]
            if all(a < b for a, b in zip(lo, hi)):
                self._plan_overlap(h, first, lo, hi, itemsize)
            first += h.nchunks

    def _plan_overlap(self, h: fmt.ShardRecord, first: int, lo: list, hi: list,
                      itemsize: int) -> None:
        rec = self.rec
        if h.shape:  # rows [r0, r1) of the shard hold the overlap
            row = math.prod(h.shape[1:]) * itemsize
            r0, r1 = lo[0] - h.offsets[0], hi[0] - h.offsets[0]
            b0, b1 = r0 * row, r1 * row
        else:
            r0 = r1 = 0
            b0, b1 = 0, itemsize
        pos, ks = 0, []
        for k in range(first, first + h.nchunks):
            n = rec.chunks[k].raw_length
            if pos < b1 and pos + n > b0:
                ks.append((k, pos))
            pos += n
        start = ks[0][1]
        end = ks[-1][1] + rec.chunks[ks[-1][0]].raw_length
        at = self._direct(h, lo, hi, itemsize)
        if at is not None and (start, end) == (b0, b1):
            # the overlap is whole rows of the shard and of the box, on chunk borders:
            # its chunks are read straight into place (no staging buffer, no copy)
            for k, p in ks:
                n = rec.chunks[k].raw_length
                self.jobs.append((rec, k, self._bytes[at + p - start:at + p - start + n]))
            return
        buf = host_bytes(end - start)
        view = buf.numpy().data
        for k, p in ks:
            self.jobs.append((rec, k, view[p - start:p - start + rec.chunks[k].raw_length]))
        self._parts.append((h, lo, hi, buf, b0 - start, b1 - start, r1 - r0))

    def _direct(self, h: fmt.ShardRecord, lo: list, hi: list, itemsize: int) -> int | None:
        """Where in the box's bytes the overlap starts, if it is one contiguous run of
        the box laid out as in the shard (full rows of both); else None."""
        for d in range(1, len(lo)):
            if not (lo[d] == h.offsets[d] == self.offsets[d]
                    and hi[d] == h.offsets[d] + h.shape[d] == self.offsets[d] + self.sizes[d]):
                return None
        if not h.shape:
            return 0
        return (lo[0] - self.offsets[0]) * math.prod(self.sizes[1:]) * itemsize

    def finish(self) -> torch.Tensor:
        for h, lo, hi, buf, a, b, nrows in self._parts:
            block = buf[a:b].view(self.dtype)
            if h.shape:
                block = block.reshape((nrows, *h.shape[1:]))
                src = block[(slice(None),) + tuple(
                    slice(l_ - so, h_ - so) for l_, h_, so in zip(lo[1:], hi[1:], h.offsets[1:]))]
            else:
                src = block.reshape(())
            dst = self.out[tuple(slice(l_ - o, h_ - o) for l_, h_, o in zip(lo, hi, self.offsets))]
            dst.copy_(src)
        return self.out


def run_jobs(storage: Storage, jobs: list, verify: bool, threads: int = READ_THREADS) -> None:
    """Read and verify chunks into their views, in parallel."""
    if threads <= 1 or len(jobs) <= 1:
        for rec, k, view in jobs:
            read_chunk(storage, rec, k, view, verify)
        return
    with cf.ThreadPoolExecutor(min(threads, len(jobs)), thread_name_prefix="ckptstore-read") as ex:
        for f in [ex.submit(read_chunk, storage, rec, k, view, verify) for rec, k, view in jobs]:
            f.result()


def read_boxes(storage: Storage, manifest: fmt.Manifest, wanted: list[tuple[int, tuple, tuple]],
               *, verify: bool = True) -> list[torch.Tensor]:
    """Read ``(tensor index, offsets, sizes)`` boxes; only the chunks they touch."""
    want: dict[int, list | None] = {}
    for i, o, s in wanted:
        want.setdefault(i, []).append((o, s))  # type: ignore[union-attr]
    manifest = fmt.resolve(storage, manifest, want)  # the rank indexes holding these boxes
    storage = linked(storage, manifest.files)  # incremental saves name older steps' files
    reads = [BoxRead(manifest.tensors[i], o, s) for i, o, s in wanted]
    jobs = [j for r in reads for j in r.jobs]
    if verify:
        check_files(storage, manifest, {rec.chunks[k].file for rec, k, _ in jobs})
    run_jobs(storage, jobs, verify)
    return [r.finish() for r in reads]
