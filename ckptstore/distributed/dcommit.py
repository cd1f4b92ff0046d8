"""The commit of a distributed save: each rank's vote, and the coordinator's manifest.

Phase 1 on every rank: wait for this rank's files, write its rank index (its files
and chunk records, :mod:`ckptstore.manifest.ranked`) and vote: ok with the index's
hash and the boxes written, or the phase and error that stopped it. Phase 2 on the
coordinator (:func:`ckptstore.commit.twophase.decide`): when every vote is ok, build
each tensor's grid from the boxes and write the manifest last. The coordinator never
sees a chunk record, so its work does not grow with the number of chunks.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch.distributed as dist

from ckptstore import manifest as fmt
from ckptstore.commit import twophase as pc
from ckptstore.commit.atomic import atomic_write, check_readable, commit_manifest, manifest_visible
from ckptstore.distributed.grids import box_rows, build_grids
from ckptstore.distributed.shards import GlobalLeaf, LocalShard
from ckptstore.errors import DistributedSaveError
from ckptstore.manifest import builder, ranked
from ckptstore.pipeline.options import SaveOptions
from ckptstore.pipeline.pipeline import SavePipeline, Staged
from ckptstore.storage import Storage


@dataclass(frozen=True, slots=True)
class RankWrite:
    """What a rank reports to the coordinator: its index file's record, its boxes as
    ``grids.box_rows`` (not its chunk records: those are in its index), its sizes."""

    rank: int
    index: fmt.FileRecord
    boxes: np.ndarray
    stored: int  #: bytes of its data files
    nfiles: int  #: its data files


@dataclass(frozen=True, slots=True)
class Global:
    """What rank 0 decided and every rank shares: where, which save, what state."""

    where: str
    save_id: str
    skeleton: Any
    glob: tuple[GlobalLeaf, ...]
    metadata: Any
    options: SaveOptions


def vote_and_commit(pipe: SavePipeline, storage: Storage, group: Any, shared: Global,
                    staged: Staged | None, shards: tuple[LocalShard, ...],
                    vote: pc.Vote | None, own_error: BaseException | None) -> tuple[int, int, int]:
    """Phase 1: wait for this rank's files, write its rank index and vote; phase 2
    (two-phase commit): rank 0 writes the manifest if every rank succeeded. Returns
    (logical bytes, stored bytes, files); raises the same DistributedSaveError on
    every rank."""
    rank = dist.get_rank()
    wrote_index = False
    if vote is None:
        assert staged is not None
        try:
            tensors, files = builder.file_records(pipe.written(staged))
            wrote_index = True
            vote = pc.Vote(rank, True, "write", None,
                           write_index(storage, shared, rank, shards, tensors, files))
        except BaseException as e:
            vote, own_error = pc.failed_vote(rank, "write", e), e
    # a DistributedSaveError from decide() means the outcome is unknown: keep the files
    decision = pc.decide(group, vote, lambda writes: commit_catalog(storage, shared, writes))
    if not decision.committed:
        if not decision.keep_files:
            if staged is not None:
                pipe.discard(staged.files)
            if wrote_index:
                try:
                    storage.remove(ranked.index_name(shared.save_id, rank))
                except Exception:
                    pass
        err = pc.error_for(decision, storage.url)
        if own_error is not None:
            err.__cause__ = own_error
        raise err
    return decision.result


def box_width(glob: tuple[GlobalLeaf, ...]) -> int:
    return max((len(g.shape) for g in glob), default=0)


def write_index(storage: Storage, shared: Global, rank: int, shards: tuple[LocalShard, ...],
                tensors: tuple[fmt.TensorRecord, ...], files: tuple[fmt.FileRecord, ...]) -> RankWrite:
    """Write this rank's index (its files, and the chunks of each box it wrote) durably,
    beside its data files; the coordinator's manifest will name it with its hash."""
    boxes = [(s.leaf, s.offsets, s.shape, t.chunks) for s, t in zip(shards, tensors)
             if math.prod(s.shape)]
    data = ranked.encode_index(ranked.RankIndex(shared.save_id, rank, files, tuple(boxes)))
    name = ranked.index_name(shared.save_id, rank)
    check_readable(data, f"rank {rank}'s index")  # never write what a reader refuses
    atomic_write(storage, name, [data])
    return RankWrite(rank, ranked.index_record(name, data),
                     box_rows([(t, o, s) for t, o, s, _ in boxes], box_width(shared.glob)),
                     sum(f.size for f in files), len(files))


def commit_catalog(storage: Storage, shared: Global, writes: list[RankWrite]) -> tuple:
    """Coordinator: the manifest of every rank's grid and index, written last."""
    manifest = merge(shared, writes)
    data = fmt.encode(manifest)
    try:
        commit_manifest(storage, manifest, overwrite=shared.options.overwrite, data=data)
    except Exception as e:
        if manifest_visible(storage, data):  # e.g. the directory fsync failed
            raise pc.MaybeCommitted(str(e)) from e
        raise
    logical = sum(t.nbytes for t in manifest.tensors)
    return (logical, sum(w.stored + w.index.size for w in writes),
            sum(w.nfiles + 1 for w in writes))


def merge(shared: Global, writes: list[RankWrite]) -> fmt.Manifest:
    """The manifest of a distributed save: each tensor's grid (which rank wrote which
    box, checked to tile it) and the ranks' index files; no chunk records."""
    writes = sorted(writes, key=lambda w: w.rank)
    if [w.rank for w in writes] != list(range(len(writes))):
        raise DistributedSaveError("the votes of a distributed save do not come from every rank")
    assert [g.id for g in shared.glob] == list(range(len(shared.glob)))
    grids = build_grids([g.shape for g in shared.glob], [w.rank for w in writes],
                        [w.boxes for w in writes], box_width(shared.glob))
    tensors = []
    for g in shared.glob:
        nbytes = math.prod(g.shape) * g.itemsize
        if not nbytes:
            tensors.append(fmt.TensorRecord(g.name, g.kind, g.dtype, g.shape, 0,
                                            fmt.digest_of([]), ()))
        elif g.id not in grids:
            raise DistributedSaveError(f"no rank wrote tensor {g.name!r}")
        else:
            tensors.append(fmt.TensorRecord(g.name, g.kind, g.dtype, g.shape, nbytes, "", (),
                                            grid=grids[g.id]))
    m = builder.assemble(save_id=shared.save_id, chunk_size=shared.options.chunk_size,
                         compression=shared.options.compression, metadata=shared.metadata,
                         tree=shared.skeleton, tensors=tensors, files=[w.index for w in writes],
                         world_size=len(writes))
    m = dataclasses.replace(m, indexes=tuple(w.index.name for w in writes))
    fmt.validate(m)  # every grid tiles its tensor: checked before committing
    return m
