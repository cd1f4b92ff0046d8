"""``ckptstore.save`` for a state sharded over ranks (DTensor / FSDP2).

Timeline on every rank::

    caller thread:  wait for this rank's previous save -> flatten (DTensors kept whole)
                    -> rank 0 broadcasts path, save id, structure hash, "exists"
                    -> plan this rank's boxes only -> stage + submit to writers
                    -> return handle            (the stall covers this rank's bytes only)
    commit thread:  wait for this rank's files -> two-phase commit (commit2pc)
                    -> handle done, or the same DistributedSaveError on every rank

Files carry the rank in their name (``shard-00000-<save id>-r<rank>.chunks``), so
ranks never collide; the coordinator's manifest lists every rank's files.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from typing import Any

import torch.distributed as dist

from ckptstore import manifest as fmt
from ckptstore.commit import twophase as pc
from ckptstore.distributed.dcommit import Global, vote_and_commit
from ckptstore.distributed.shards import GlobalLeaf, LocalShard, describe, flatten_global, local_shards
from ckptstore.errors import CheckpointExistsError, DistributedSaveError
from ckptstore.pipeline.engine import engine
from ckptstore.pipeline.handle import SaveHandle, SaveResult
from ckptstore.pipeline.options import SaveOptions, check_importable
from ckptstore.pipeline.pipeline import SavePipeline, Staged
from ckptstore.plan.tree import Leaf
from ckptstore.storage import Storage, open_storage


def _structure_hash(skeleton: Any, glob: tuple[GlobalLeaf, ...]) -> str:
    text = json.dumps([skeleton, [[g.name, g.kind, g.dtype, list(g.shape), g.sharded]
                                  for g in glob]], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def save(state: Any, path: str | os.PathLike | Storage, options: SaveOptions, *,
         metadata: Any = None, blocking: bool = False,
         storage_options: dict | None = None, overlap: bool = False) -> SaveHandle:
    """Collective save: every rank calls it with its part of the same state.

    Same arguments and handle as :func:`ckptstore.save`; the path of rank 0 wins.
    Plain (non-DTensor) tensors and values must be equal on every rank (as in DCP):
    each is written once, by one rank.
    """
    if isinstance(path, Storage):  # every rank runs the same script: they refuse alike
        check_importable(path)
    group = pc.coordination_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    eng = engine()
    # every rank must stop at a busy engine alike, or the others wait for this one
    with eng.admit(options.if_busy):
        t0 = time.perf_counter()
        skeleton, leaves, dtensors = flatten_global(state)
        glob = describe(leaves, dtensors)
        ident = _structure_hash(skeleton, glob)
        where, save_id, ident0 = _agree_on_target(path, rank, ident, options, storage_options,
                                                  group)
        storage = path if isinstance(path, Storage) else open_storage(where, storage_options)
        options = options.for_storage(storage)  # the same on every rank: same storage kind
        shared = Global(where, save_id, skeleton, glob, metadata, options)
        handle = SaveHandle(where)
        pipe = SavePipeline(eng, storage, options)
        staged: Staged | None = None
        shards: tuple[LocalShard, ...] = ()
        failure: pc.Vote | None = None
        own_error: BaseException | None = None
        try:
            if ident != ident0:
                raise DistributedSaveError(
                    f"rank {rank}'s state differs from rank 0's: keys, shapes, dtypes or a "
                    "non-tensor value (every plain value, e.g. a step counter or timestamp, "
                    "must be equal on all ranks; take it from rank 0)")
            if storage.url != where:
                raise DistributedSaveError(f"rank {rank} saves to {storage.url}, rank 0 to {where}")
        except DistributedSaveError as e:
            failure, own_error = pc.failed_vote(rank, "plan", e), e
        if failure is None:
            try:
                boxes = local_shards(glob, leaves, dtensors, rank, world)
                shards = tuple(s for s, _ in boxes)
                local = [Leaf(i, (f"{glob[s.leaf].name}@{','.join(map(str, s.offsets))}",), t)
                         for i, (s, t) in enumerate(boxes)]
                staged = pipe.stage(local, pipe.plan(local, f"{save_id}-r{rank}"),
                                    overlap=overlap)
                handle.copies_pending(staged.wait_copied)
            except Exception as e:
                failure, own_error = pc.failed_vote(rank, "stage", e), e
        handle.staged_seconds = time.perf_counter() - t0

        def finish() -> SaveResult:
            logical, stored, nfiles = vote_and_commit(pipe, storage, group, shared, staged,
                                                       shards, failure, own_error)
            return SaveResult(storage.url, save_id, logical, stored, nfiles,
                              handle.staged_seconds, time.perf_counter() - t0)

        # a rank that failed votes now, so every rank raises the same error
        eng.complete(handle, finish, background=failure is None)
        if failure is not None:
            handle.wait()
    if blocking:
        handle.wait()
    return handle


def _agree_on_target(path: str | os.PathLike | Storage, rank: int, ident: str,
                     options: SaveOptions, storage_options: dict | None,
                     group: Any) -> tuple[str, str, str]:
    """Rank 0 decides where the save goes and its id, and whether it may (collective)."""
    mine = path.url if isinstance(path, Storage) else os.fspath(path)
    decided = None
    if rank == pc.COORDINATOR:
        try:
            storage0 = open_storage(path, storage_options)
            decided = ("ok", mine, secrets.token_hex(6), ident,
                       storage0.exists(fmt.MANIFEST_NAME) and not options.overwrite)
        except Exception as e:  # tell the others before raising, or they wait it out
            _announce(("error", type(e).__name__, str(e)), group)
            raise
    decided = _announce(decided, group)
    if decided[0] == "error":
        raise DistributedSaveError(
            f"rank 0 could not start the save: {decided[1]}: {decided[2]}",
            ((pc.COORDINATOR, "plan", decided[1], decided[2]),))
    _, where, save_id, ident0, exists = decided
    if exists:
        raise CheckpointExistsError(
            f"{where} already holds a committed checkpoint; save to a new path or pass "
            "overwrite=True")
    return where, save_id, ident0


def _announce(decided: Any, group: Any) -> Any:
    """Broadcast rank 0's decision (path, save id, ...) with a typed error on failure."""
    try:
        return pc.broadcast(decided, group)
    except RuntimeError as e:  # gloo timeout or a dead peer
        raise DistributedSaveError(
            f"the ranks could not agree on where to save: {e}",
            ((None, "collective", type(e).__name__, str(e)),)) from e
