"""Loading sharded checkpoints on any number of ranks: each rank reads only the
chunks that hold the boxes it needs.

A box read intersects the wanted box with every stored shard of the tensor; for each
overlap it reads the rows of that shard the overlap spans (a contiguous byte range
of the shard, so chunk-granular and row-aligned), verifies each chunk's hash, and
copies the overlap into place. Saved at N ranks, loaded at M: the boxes of the M
ranks come from their own DTensors (``__create_chunk_list__``), so any placement DCP
understands works, and M = 1 without a process group assembles whole tensors.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ckptstore import manifest as fmt
from ckptstore.distributed.shards import check_contiguous, holds_dtensor, is_dtensor
from ckptstore.errors import CorruptCheckpointError
from ckptstore.plan.tree import torch_dtype, unflatten
from ckptstore.read.into import Action, StatefulSlot, copy_into, give_state, leaves_of, subtree
from ckptstore.read.reader import READ_THREADS, read_chunk, read_tensors
from ckptstore.storage import Storage
from ckptstore.storage.base import linked
from ckptstore.verify.checks import check_files


@dataclass(frozen=True, slots=True)
class Ref:
    """A leaf of the saved tree, not read yet."""

    kind: str  # "tensor" | "ndarray"
    index: int


def _storage_for(storage: Storage, manifest: fmt.Manifest) -> Storage:
    return linked(storage, manifest.files)  # incremental saves name older steps' files


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
        self.out = torch.empty(self.sizes, dtype=self.dtype)
        self.jobs: list[tuple] = []
        self._parts: list[tuple] = []
        if self.out.numel() == 0:
            return
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
        buf = torch.empty(end - start, dtype=torch.uint8)
        view = buf.numpy().data
        for k, p in ks:
            self.jobs.append((rec, k, view[p - start:p - start + rec.chunks[k].raw_length]))
        self._parts.append((h, lo, hi, buf, b0 - start, b1 - start, r1 - r0))

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
    storage = _storage_for(storage, manifest)
    reads = [BoxRead(manifest.tensors[i], o, s) for i, o, s in wanted]
    jobs = [j for r in reads for j in r.jobs]
    if verify:
        check_files(storage, manifest, {rec.chunks[k].file for rec, k, _ in jobs})
    run_jobs(storage, jobs, verify)
    return [r.finish() for r in reads]


def _refs(manifest: fmt.Manifest) -> Any:
    def leaf(kind: str, i: Any) -> Ref:
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(manifest.tensors):
            raise CorruptCheckpointError(f"state tree refers to tensor {i!r}, which does not exist")
        want = "torch" if kind == "tensor" else "numpy"
        if manifest.tensors[i].kind != want:
            raise CorruptCheckpointError(f"state tree expects a {want} array for tensor {i}")
        return Ref(kind, i)

    return unflatten(manifest.tree, leaf)


def _read_whole(storage: Storage, manifest: fmt.Manifest, refs: list[Ref],
                verify: bool) -> dict[int, Any]:
    """Whole arrays for ``refs``: torch tensors assembled from shards, numpy as saved."""
    torch_ids = sorted({r.index for r in refs if r.kind == "tensor"})
    np_ids = {r.index for r in refs if r.kind != "tensor"}
    manifest = fmt.resolve(storage, manifest, dict.fromkeys([*torch_ids, *np_ids]))
    recs = manifest.tensors
    out = dict(zip(torch_ids, read_boxes(
        storage, manifest, [(i, (0,) * len(recs[i].shape), recs[i].shape) for i in torch_ids],
        verify=verify)))
    if np_ids:
        ids = {id(recs[i]) for i in np_ids}
        out.update(read_tensors(_storage_for(storage, manifest), manifest, verify=verify,
                                select=lambda r: id(r) in ids))
    return out


def _substitute(tree: Any, values: Callable[[Ref], Any]) -> Any:
    if isinstance(tree, Ref):
        return values(tree)
    if isinstance(tree, dict):
        out = type(tree)()
        for k, v in tree.items():
            out[k] = _substitute(v, values)
        return out
    if isinstance(tree, list):
        return [_substitute(v, values) for v in tree]
    if isinstance(tree, tuple):
        return tuple(_substitute(v, values) for v in tree)
    if isinstance(tree, argparse.Namespace):
        return argparse.Namespace(**{k: _substitute(v, values) for k, v in vars(tree).items()})
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):  # rebuilt as plan.values does
        obj: Any = object.__new__(type(tree))  # type: ignore[arg-type]
        for f in dataclasses.fields(tree):
            object.__setattr__(obj, f.name, _substitute(getattr(tree, f.name), values))
        return obj
    return tree


def _refs_in(tree: Any) -> list[Ref]:
    """Every array reference in ``tree``, typed values (dataclasses, namespaces) included."""
    found: list[Ref] = []

    def keep(r: Ref) -> Ref:
        found.append(r)
        return r

    _substitute(tree, keep)
    return found


def load_resharded(storage: Storage, manifest: fmt.Manifest, *, into: Any = None,
                   strict: bool = True, verify: bool = True, cast: bool = False) -> Any:
    """``ckptstore.load`` for sharded checkpoints and/or DTensor targets.

    Without ``into``: the whole tree with whole tensors. With ``into`` (a state dict
    or module, DTensors allowed): each DTensor receives only its local box, read from
    the chunks that hold it; returns a :class:`LoadReport`.
    """
    tree = _refs(manifest)
    if into is None:
        refs = _refs_in(tree)
        whole = _read_whole(storage, manifest, refs, verify)
        return _substitute(tree, lambda r: whole[r.index])
    if isinstance(into, torch.nn.Module):
        into = into.state_dict()
    # as DCP does: a Stateful object whose state holds DTensors has its state_dict() as
    # the target (the DTensors receive their boxes in place), then given back through
    # load_state_dict(); any other Stateful object gets its part of the checkpoint whole.
    # Plain dicts from get_state_dict() stay allowed here, as dcp.load allows them:
    # DCP's documented pattern loads into them and then calls set_state_dict().
    objects: list[tuple[Any, Any]] = []
    for value, _parent, _key in leaves_of(into).values():
        if isinstance(value, StatefulSlot):
            sd = value.obj.state_dict()
            if holds_dtensor(sd):
                objects.append((value.obj, sd))
    src = {k: v[0] for k, v in leaves_of(tree).items()}
    dst = leaves_of(into, expand={id(obj): sd for obj, sd in objects})
    slots = {name: v[0].path for name, v in dst.items() if isinstance(v[0], StatefulSlot)}
    for name, path in slots.items():
        for k in [k for k in src if not path or k == name or k.startswith(name + ".")]:
            del src[k]
        found, sub = subtree(tree, path)
        if found:
            src[name] = sub
    boxes: dict[str, Any] = {}
    arrays: dict[int, Any] = {}

    def prepare(actions: list[Action]) -> None:
        """Plan every read first, so all chunks are fetched in one parallel pass."""
        nonlocal manifest
        wanted, names, whole = [], [], []
        for name, value, _parent, _key in actions:
            s = src[name]
            if isinstance(s, Ref) and is_dtensor(value):
                check_contiguous(name, value)  # else the box below would be its first part only
                (c,) = value.__create_chunk_list__()
                wanted.append((s.index, tuple(c.offsets), tuple(c.sizes)))
                names.append(name)
            elif isinstance(s, Ref):
                whole.append(s)
            else:  # the whole part of a Stateful object, or arrays inside a typed value
                whole += _refs_in(s)
        # one pass over the rank indexes holding what this rank reads, in parallel
        want: dict[int, list | None] = dict.fromkeys(r.index for r in whole)
        for i, o, s in wanted:
            if i not in want:
                want.setdefault(i, []).append((o, s))  # type: ignore[union-attr]
            elif want[i] is not None:
                want[i].append((o, s))  # type: ignore[union-attr]
        manifest = fmt.resolve(storage, manifest, want)
        boxes.update(zip(names, read_boxes(storage, manifest, wanted, verify=verify)))
        arrays.update(_read_whole(storage, manifest, whole, verify))

    def resolve(name: str, value: Any) -> tuple[Any, Any]:
        if name in boxes:  # a DTensor receives its own box into its local shard
            local = value.to_local()
            return local, boxes[name].reshape(local.shape)
        return value, _substitute(src[name], lambda r: arrays[r.index])

    report = copy_into(src, dst, strict=strict, cast=cast,
                       unexpected=[k for k in src if k not in dst],
                       compare=lambda s, d, c: _compare(manifest, s, d, c),
                       prepare=prepare, resolve=resolve)
    why = [(type(obj).__name__, w) for obj, state in objects
           if (w := give_state(type(obj).__name__, obj, state, strict))]
    if why:
        report = dataclasses.replace(report, mismatched=report.mismatched + tuple(why))
    return report


def _compare(manifest: fmt.Manifest, src: Any, dst: Any, cast: bool) -> str | None:
    if not isinstance(dst, (torch.Tensor, np.ndarray)):
        return None
    if not isinstance(src, Ref):
        return f"checkpoint holds a {type(src).__name__}, not a tensor"
    rec = manifest.tensors[src.index]
    if tuple(rec.shape) != tuple(dst.shape):
        return f"shape {list(rec.shape)} in checkpoint, {list(dst.shape)} here"
    here = str(dst.dtype).removeprefix("torch.") if isinstance(dst, torch.Tensor) else dst.dtype.str
    if rec.dtype != here and not cast:
        return f"dtype {rec.dtype} in checkpoint, {here} here (pass cast=True to convert)"
    if isinstance(dst, np.ndarray) and rec.kind != "numpy":
        return "checkpoint holds a torch tensor, not a numpy array"
    return None
