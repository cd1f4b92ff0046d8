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
from ckptstore.read.reader import READ_THREADS, FileMaps, cached, read_chunk
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

    def __init__(self, rec: fmt.TensorRecord, offsets: tuple, sizes: tuple,
                 maps: FileMaps | None = None) -> None:
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
        self.jobs: list[tuple] = []
        self._parts: list[tuple] = []
        if math.prod(self.sizes) == 0:
            self.out = host_empty(self.sizes, self.dtype)
            return
        overlaps, first = [], 0
        for h in whole_shards(rec):
            lo = [max(o, so) for o, so in zip(self.offsets, h.offsets)]
            hi = [min(o + n, so + sn) for o, n, so, sn in
                  zip(self.offsets, self.sizes, h.offsets, h.shape)]
            if all(a < b for a, b in zip(lo, hi)):
                overlaps.append((h, first, lo, hi))
            first += h.nchunks
        if maps is not None and len(overlaps) == 1 and self._mapped(maps, *overlaps[0], itemsize):
            return
        self.out = host_empty(self.sizes, self.dtype)
        self._bytes = self.out.view(-1).view(torch.uint8).numpy().data
        for h, first, lo, hi in overlaps:
            self._plan_overlap(h, first, lo, hi, itemsize)

    def _mapped(self, maps: FileMaps, h: fmt.ShardRecord, first: int, lo: list, hi: list,
                itemsize: int) -> bool:
        """The box as a view of the mapped file, if it is one whole run of raw chunks
        there; its chunks are then only verified, in place."""
        if self._direct(h, lo, hi, itemsize) != 0 or (h.shape and hi[0] - lo[0] != self.sizes[0]):
            return False
        b0, b1, ks = self._span(h, first, lo, hi, itemsize)
        if self._covered(ks) != (b0, b1):
            return False
        out = maps.run(self.rec, [k for k, _ in ks], self.dtype, self.sizes)
        if out is None:
            return False
        self.out = out
        self.jobs = [(self.rec, k, maps.chunk_view(self.rec, k)) for k, _ in ks]
        return True

    def _span(self, h: fmt.ShardRecord, first: int, lo: list, hi: list, itemsize: int
              ) -> tuple[int, int, list[tuple[int, int]]]:
        """Bytes [b0, b1) of shard ``h`` that hold the overlap, and the chunks (index,
        position in the shard) that cover them."""
        if h.shape:  # rows [r0, r1) of the shard hold the overlap
            row = math.prod(h.shape[1:]) * itemsize
            b0, b1 = (lo[0] - h.offsets[0]) * row, (hi[0] - h.offsets[0]) * row
        else:
            b0, b1 = 0, itemsize
        pos, ks = 0, []
        for k in range(first, first + h.nchunks):
            n = self.rec.chunks[k].raw_length
            if pos < b1 and pos + n > b0:
                ks.append((k, pos))
            pos += n
        return b0, b1, ks

    def _covered(self, ks: list[tuple[int, int]]) -> tuple[int, int]:
        """Bytes [start, end) of the shard that chunks ``ks`` (from :meth:`_span`) hold:
        the overlap's bytes exactly when it begins and ends on chunk borders."""
        return ks[0][1], ks[-1][1] + self.rec.chunks[ks[-1][0]].raw_length

    def _plan_overlap(self, h: fmt.ShardRecord, first: int, lo: list, hi: list,
                      itemsize: int) -> None:
        rec = self.rec
        b0, b1, ks = self._span(h, first, lo, hi, itemsize)
        nrows = hi[0] - lo[0] if h.shape else 0
        start, end = self._covered(ks)
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
        self._parts.append((h, lo, hi, buf, b0 - start, b1 - start, nrows))

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
               *, verify: bool = True, transient: bool = False) -> list[torch.Tensor]:
    """Read ``(tensor index, offsets, sizes)`` boxes; only the chunks they touch.

    ``transient``: the caller copies the boxes out and drops them before it returns
    (a load into a target). A box that is one run of raw chunks of a local file in the
    page cache (a memory tier's files always are) is then a view of the mapped file:
    its chunks are hashed in place and the one copy is the caller's, into the target.
    """
    want: dict[int, list | None] = {}
    for i, o, s in wanted:
        want.setdefault(i, []).append((o, s))  # type: ignore[union-attr]
    manifest = fmt.resolve(storage, manifest, want)  # the rank indexes holding these boxes
    storage = linked(storage, manifest.files)  # incremental saves name older steps' files
    maps = None
    if transient and cached(storage, {c.file for i, _o, _s in wanted
                                      for c in manifest.tensors[i].chunks[:1]}):
        maps = FileMaps(storage, manifest)
    reads = [BoxRead(manifest.tensors[i], o, s, maps) for i, o, s in wanted]
    jobs = [j for r in reads for j in r.jobs]
    if verify:
        check_files(storage, manifest, {rec.chunks[k].file for rec, k, _ in jobs})
    run_jobs(storage, jobs, verify)
    return [r.finish() for r in reads]
