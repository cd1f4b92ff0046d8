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

import datetime as _dt
import hashlib
import json
import math
import os
import platform
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ckptstore import __version__, manifest as fmt
from ckptstore.api import save as _saver
from ckptstore.commit import twophase as pc
from ckptstore.commit.atomic import commit_manifest
from ckptstore.distributed.shards import (
    GlobalLeaf,
    LocalShard,
    describe,
    flatten_global,
    local_shards,
)
from ckptstore.errors import CheckpointExistsError, DistributedSaveError
from ckptstore.plan.layout import make_plan
from ckptstore.plan.tree import Leaf
from ckptstore.staging.arena import Ring
from ckptstore.storage import Storage, open_storage


@dataclass(frozen=True, slots=True)
class RankWrite:
    """What a rank wrote: its boxes, their tensor records (chunks) and its files."""

    rank: int
    shards: tuple  # LocalShard, parallel to tensors
    tensors: tuple  # fmt.TensorRecord of each box
    files: tuple  # fmt.FileRecord


def _structure_hash(skeleton: Any, glob: tuple[GlobalLeaf, ...]) -> str:
    text = json.dumps([skeleton, [[g.name, g.kind, g.dtype, list(g.shape), g.sharded]
                                  for g in glob]], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def save(state: Any, path: "str | os.PathLike | Storage", *, compression: str = "zstd",
         blocking: bool = False, metadata: Any = None, zstd_level: int = 1,
         byte_grouping: bool = True, staging_budget: int | None = None,
         chunk_size: int = _saver.DEFAULT_CHUNK, shard_size: int = _saver.DEFAULT_SHARD,
         if_busy: str = "wait", overwrite: bool = False,
         storage_options: dict | None = None) -> _saver.SaveHandle:
    """Collective save: every rank calls it with its part of the same state.

    Same arguments and handle as :func:`ckptstore.save`; the path of rank 0 wins.
    Plain (non-DTensor) tensors and values must be equal on every rank (as in DCP):
    each is written once, by one rank.
    """
    _saver.check_save_args(compression=compression, if_busy=if_busy, chunk_size=chunk_size,
                           metadata=metadata)
    if isinstance(path, Storage):  # every rank runs the same script: they refuse alike
        _saver.check_importable(path)
    group = pc.coordination_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    eng = _saver.engine()
    with eng.lock:
        prev = eng.last
        if prev is not None:
            if not prev.done() and if_busy == "raise":
                # every rank must stop here alike, or the others wait for this one
                raise _saver.StagingBusyError(
                    f"the previous save to {prev.path} is still writing; wait for it")
            prev.exception()
            err = prev._take_unobserved_error()
            if err is not None:
                raise err
        t0 = time.perf_counter()
        skeleton, leaves, dtensors = flatten_global(state)
        glob = describe(leaves, dtensors)
        ident = _structure_hash(skeleton, glob)
        mine = path.url if isinstance(path, Storage) else os.fspath(path)
        decided = None
        if rank == pc.COORDINATOR:
            try:
                storage0 = open_storage(path, storage_options)
                decided = ("ok", mine, secrets.token_hex(6), ident,
                           storage0.exists(fmt.MANIFEST_NAME) and not overwrite)
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
        storage = path if isinstance(path, Storage) else open_storage(where, storage_options)
        handle = _saver.SaveHandle(where)
        codec = "raw" if compression == "none" else compression
        futures: list = []
        ring = None
        failure: pc.Vote | None = None
        own_error: BaseException | None = None
        plan = None
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
                local = [Leaf(i, (f"{glob[s.leaf].name}@{','.join(map(str, s.offsets))}",), t)
                         for i, (s, t) in enumerate(boxes)]
                if staging_budget is not None:
                    shard_size = max(chunk_size, min(shard_size, int(staging_budget) // 2))
                plan = make_plan(local, chunk_size=chunk_size, shard_size=shard_size,
                                 compressed=codec != "raw", byte_grouping=byte_grouping,
                                 save_id=f"{save_id}-r{rank}")
                capacity = sum(-(-f.nbytes // 4096) * 4096 for f in plan.files)
                if staging_budget is not None:
                    capacity = min(capacity, max(int(staging_budget),
                                                 max((f.nbytes for f in plan.files), default=0)))
                arena = eng.staging.ensure(max(capacity, 4096))
                ring = Ring(arena.size)
                storage.makedirs()
                eng.writers.start_async()  # writer start-up overlaps staging
                for fp in plan.files:
                    futures.append((fp, _saver._stage_and_submit(
                        eng.writers, storage, arena, ring, fp, plan, local, codec, zstd_level)))
            except Exception as e:
                _saver._cleanup(storage, futures, ring)
                if isinstance(e, _saver.BrokenProcessPool):
                    eng.writers.reset()
                failure, own_error = pc.failed_vote(rank, "stage", e), e
        handle.staged_seconds = time.perf_counter() - t0
        meta = dict(skeleton=skeleton, metadata=metadata, plan=plan, save_id=save_id,
                    compression=compression, glob=glob, overwrite=overwrite,
                    boxes=tuple(s for s, _ in boxes) if failure is None else ())
        if failure is not None:  # vote now, so every rank raises the same error
            _run_commit(eng, storage, group, futures, handle, meta, t0, failure, own_error)
            eng.last = handle
            handle.wait()
        threading.Thread(target=_run_commit, args=(eng, storage, group, futures, handle, meta,
                                                   t0, None, None),
                         name="ckptstore-dist-commit", daemon=True).start()
        eng.last = handle
    if blocking:
        handle.wait()
    return handle


def _run_commit(eng, storage: Storage, group, futures, handle: _saver.SaveHandle, meta: dict,
                t0: float, vote: pc.Vote | None, own_error: BaseException | None) -> None:
    rank = dist.get_rank()
    if vote is None:
        try:
            results = {fp.name: f.result() for fp, f in futures}
            local = _saver._manifest(dict(meta, skeleton=None, metadata=None), results)
            vote = pc.Vote(rank, True, "write", None,
                           RankWrite(rank, meta["boxes"], local.tensors, local.files))
        except BaseException as e:
            if isinstance(e, _saver.BrokenProcessPool):
                eng.writers.reset()
            vote, own_error = pc.failed_vote(rank, "write", e), e
    try:
        decision = pc.decide(group, vote, lambda writes: _commit_manifest(storage, meta, writes))
    except DistributedSaveError as e:  # outcome unknown: keep the files
        handle._finish(None, e)
        return
    if not decision.committed:
        if not decision.keep_files:
            _saver._cleanup(storage, futures, None)
        err = pc.error_for(decision, storage.url)
        if own_error is not None:
            err.__cause__ = own_error
        handle._finish(None, err)
        return
    logical, stored, nfiles = decision.result
    handle._finish(_saver.SaveResult(storage.url, meta["save_id"], logical, stored, nfiles,
                                     handle.staged_seconds, time.perf_counter() - t0), None)


def _commit_manifest(storage: Storage, meta: dict, writes: list[RankWrite]) -> tuple:
    """Coordinator: merge every rank's records into one manifest and write it last."""
    manifest = merge(meta, writes)
    data = fmt.encode(manifest)
    try:
        commit_manifest(storage, manifest, overwrite=meta["overwrite"])
    except Exception as e:
        if _saver._manifest_visible(storage, data):  # e.g. the directory fsync failed
            raise pc.MaybeCommitted(str(e)) from e
        raise
    logical = sum(t.nbytes for t in manifest.tensors)
    return logical, sum(f.size for f in manifest.files), len(manifest.files)


def _announce(decided: Any, group: Any) -> Any:
    """Broadcast rank 0's decision (path, save id, ...) with a typed error on failure."""
    try:
        return pc.broadcast(decided, group)
    except RuntimeError as e:  # gloo timeout or a dead peer
        raise DistributedSaveError(
            f"the ranks could not agree on where to save: {e}",
            ((None, "collective", type(e).__name__, str(e)),)) from e


def merge(meta: dict, writes: list[RankWrite]) -> fmt.Manifest:
    """The global manifest: each leaf's boxes in offset order, chunks concatenated."""
    glob: tuple[GlobalLeaf, ...] = meta["glob"]
    boxes: dict[int, list[tuple[LocalShard, fmt.TensorRecord]]] = {}
    files: list = []
    for w in writes:
        files.extend(w.files)
        for s, rec in zip(w.shards, w.tensors):
            boxes.setdefault(s.leaf, []).append((s, rec))
    tensors = []
    for g in glob:
        parts = sorted(boxes.get(g.id, []), key=lambda p: p[0].offsets)
        nbytes = math.prod(g.shape) * g.itemsize
        whole = len(parts) == 1 and parts[0][0].shape == g.shape
        chunks = tuple(c for _, rec in parts for c in rec.chunks)
        shards = () if whole or not parts else tuple(
            fmt.ShardRecord(s.offsets, s.shape, len(rec.chunks)) for s, rec in parts)
        tensors.append(fmt.TensorRecord(g.name, g.kind, g.dtype, g.shape, nbytes,
                                        fmt.digest_of([c.raw_hash for c in chunks]), chunks,
                                        shards))
    m = fmt.Manifest(
        schema_version=fmt.SCHEMA_VERSION,
        writer={"library": "ckptstore", "version": __version__, "torch": torch.__version__,
                "python": platform.python_version(), "world_size": len(writes)},
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        save_id=meta["save_id"], chunk_size=meta["plan"].chunk_size,
        compression=meta["compression"], metadata=meta["metadata"], tree=meta["skeleton"],
        tensors=tuple(tensors), files=tuple(files))
    fmt.validate(m)  # shards tile every tensor, no overlaps: checked before committing
    return m
