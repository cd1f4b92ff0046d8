"""The commit of a distributed save: each rank's vote, and the coordinator's manifest.

Phase 1 on every rank: wait for this rank's files and vote (ok and what it wrote, or
the phase and error that stopped it). Phase 2 on the coordinator
(:func:`ckptstore.commit.twophase.decide`): when every vote is ok, merge the ranks'
records into the manifest and write it last.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from ckptstore import manifest as fmt
from ckptstore.commit import twophase as pc
from ckptstore.commit.atomic import commit_manifest, manifest_visible
from ckptstore.distributed.shards import GlobalLeaf, LocalShard
from ckptstore.manifest import builder
from ckptstore.pipeline.options import SaveOptions
from ckptstore.pipeline.pipeline import SavePipeline, Staged
from ckptstore.storage import Storage


@dataclass(frozen=True, slots=True)
class RankWrite:
    """What a rank wrote: its boxes, their tensor records (chunks) and its files."""

    rank: int
    shards: tuple[LocalShard, ...]
    tensors: tuple[fmt.TensorRecord, ...]  # one per box, parallel to shards
    files: tuple[fmt.FileRecord, ...]


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
    """Phase 1: wait for this rank's files and vote; phase 2 (two-phase commit):
    rank 0 writes the manifest if every rank succeeded. Returns (logical bytes,
    stored bytes, files); raises the same DistributedSaveError on every rank."""
    rank = dist.get_rank()
    if vote is None:
        assert staged is not None
        try:
            tensors, files = builder.file_records(pipe.written(staged))
            vote = pc.Vote(rank, True, "write", None, RankWrite(rank, shards, tensors, files))
        except BaseException as e:
            vote, own_error = pc.failed_vote(rank, "write", e), e
    # a DistributedSaveError from decide() means the outcome is unknown: keep the files
    decision = pc.decide(group, vote, lambda writes: _commit_manifest(storage, shared, writes))
    if not decision.committed:
        if not decision.keep_files and staged is not None:
            pipe.discard(staged.files)
        err = pc.error_for(decision, storage.url)
        if own_error is not None:
            err.__cause__ = own_error
        raise err
    return decision.result


def _commit_manifest(storage: Storage, shared: Global, writes: list[RankWrite]) -> tuple:
    """Coordinator: merge every rank's records into one manifest and write it last."""
    manifest = merge(shared, writes)
    data = fmt.encode(manifest)
    try:
        commit_manifest(storage, manifest, overwrite=shared.options.overwrite, data=data)
    except Exception as e:
        if manifest_visible(storage, data):  # e.g. the directory fsync failed
            raise pc.MaybeCommitted(str(e)) from e
        raise
    logical = sum(t.nbytes for t in manifest.tensors)
    return logical, sum(f.size for f in manifest.files), len(manifest.files)


def merge(shared: Global, writes: list[RankWrite]) -> fmt.Manifest:
    """The global manifest: each leaf's boxes in offset order, chunks concatenated."""
    boxes: dict[int, list[builder.Part]] = {}
    files: list[fmt.FileRecord] = []
    for w in writes:
        files.extend(w.files)
        for s, rec in zip(w.shards, w.tensors):
            boxes.setdefault(s.leaf, []).append((s.offsets, s.shape, rec.chunks))
    tensors = [builder.tensor_record(g.name, g.kind, g.dtype, g.shape,
                                     math.prod(g.shape) * g.itemsize, boxes.get(g.id, []))
               for g in shared.glob]
    m = builder.assemble(save_id=shared.save_id, chunk_size=shared.options.chunk_size,
                         compression=shared.options.compression, metadata=shared.metadata,
                         tree=shared.skeleton, tensors=tensors, files=files,
                         world_size=len(writes))
    fmt.validate(m)  # shards tile every tensor, no overlaps: checked before committing
    return m
