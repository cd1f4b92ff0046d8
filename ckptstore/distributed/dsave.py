"""``ckptstore.save`` for a state sharded over ranks (DTensor / FSDP2).

Timeline on every rank::

    caller thread:  wait for this rank's previous save -> flatten (DTensors kept whole)
                    -> mark the path (a collective save is in flight there)
                    -> join: every rank's vote to every rank (ok + structure hash, and
                       rank 0's path, save id, "exists"; or the error that stopped it),
                       so a rank that failed so far fails the save on every rank at once
                    -> plan this rank's boxes only -> stage + submit to writers
                    -> return handle            (the stall covers this rank's bytes only)
    commit thread:  wait for this rank's files -> two-phase commit (commit2pc)
                    -> handle done, or the same DistributedSaveError on every rank

Files carry the rank in their name (``shard-00000-<save id>-r<rank>.chunks``), so
ranks never collide; the coordinator's manifest lists every rank's files.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import time
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from ckptstore import manifest as fmt
from ckptstore.commit import twophase as pc
from ckptstore.commit.atomic import TEMP_PREFIX
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
         storage_options: dict | None = None, overlap: bool = False,
         stray: bool = False) -> SaveHandle:
    """Collective save: every rank calls it with its part of the same state.

    Same arguments and handle as :func:`ckptstore.save`; the path of rank 0 wins.
    Plain (non-DTensor) tensors and values must be equal on every rank (as in DCP):
    each is written once, by one rank. ``stray``: this rank's state holds no DTensors
    but it found a collective save to its path in flight: it joins only to fail it.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    eng = engine()
    with contextlib.ExitStack() as admitted:
        t0 = time.perf_counter()
        own_error: BaseException | None = None
        start_failed = False  # rank 0 could not open its path: it raises its own error
        target: _Target | None = None
        ident: str | None = None
        claimed: Storage | None = None
        try:  # nothing here may raise before the join, or the others wait for this rank
            if rank == pc.COORDINATOR:
                start_failed = True
                target = _target(path, options, storage_options)
                start_failed = False
            if stray:
                raise DistributedSaveError(_stray_message(rank, path))
            if isinstance(path, Storage):  # writer processes must be able to import it
                check_importable(path)
            # a busy engine or a stale error of an earlier save fails this rank's vote
            admitted.enter_context(eng.admit(options.if_busy))
            skeleton, leaves, dtensors = flatten_global(state)
            glob = describe(leaves, dtensors)
            ident = _structure_hash(skeleton, glob)
            claimed = _claim(path, storage_options)  # before the groups exist: see MARKER
        except Exception as e:
            own_error = e
        vote = (pc.failed_vote(rank, "plan", own_error) if own_error is not None
                else pc.Vote(rank, True, "join", None, (ident, target)))
        try:
            votes = pc.join(vote)
        finally:
            if claimed is not None:  # every rank joined (or the save failed): no stray can come
                _release(claimed)
        failures = _join_failures(votes)
        if failures:
            if start_failed and own_error is not None:
                raise own_error
            url = next((v.payload[1].where for v in votes if v.ok and v.payload[1]), _url(path))
            parts = "; ".join(f"rank {r} failed in {ph}: {t}: {m}" for r, ph, t, m in failures)
            raise DistributedSaveError(
                f"the ranks could not start the save to {url}: {parts}; nothing was written, "
                "the previous checkpoint is untouched", failures) from own_error
        target = votes[0].payload[1]
        assert target is not None
        if target.exists:
            raise CheckpointExistsError(
                f"{target.where} already holds a committed checkpoint; save to a new path or "
                "pass overwrite=True")
        where, save_id = target.where, target.save_id
        group = pc.coordination_group()
        storage = path if isinstance(path, Storage) else open_storage(where, storage_options)
        options = options.for_storage(storage)  # the same on every rank: same storage kind
        shared = Global(where, save_id, skeleton, glob, metadata, options)
        handle = SaveHandle(where)
        pipe = SavePipeline(eng, storage, options)
        staged: Staged | None = None
        shards: tuple[LocalShard, ...] = ()
        failure: pc.Vote | None = None
        if storage.url != where:
            own_error = DistributedSaveError(f"rank {rank} saves to {storage.url}, rank 0 to {where}")
            failure = pc.failed_vote(rank, "plan", own_error)
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


@dataclass(frozen=True, slots=True)
class _Target:
    """Rank 0's decision, sent to every rank with its join vote."""

    where: str
    save_id: str
    exists: bool  # a committed checkpoint is there and overwrite is off


def _target(path: str | os.PathLike | Storage, options: SaveOptions,
            storage_options: dict | None) -> _Target:
    """Rank 0 decides where the save goes, its id, and whether it may."""
    storage0 = open_storage(path, storage_options)
    return _Target(_url(path), secrets.token_hex(6),
                   storage0.exists(fmt.MANIFEST_NAME) and not options.overwrite)


def _url(path: str | os.PathLike | Storage) -> str:
    return path.url if isinstance(path, Storage) else os.fspath(path)


def _join_failures(votes: list[pc.Vote]) -> tuple[pc.Failure, ...]:
    """The ranks that cannot take part (the same on every rank: every rank has every vote)."""
    failed = tuple((v.rank, v.phase, *v.error) for v in votes if not v.ok and v.error)
    if failed:
        return failed
    ident0 = votes[pc.COORDINATOR].payload[0]
    return tuple(
        (v.rank, "plan", DistributedSaveError.__name__,
         f"rank {v.rank}'s state differs from rank 0's: keys, shapes, dtypes or a non-tensor "
         "value (every plain value, e.g. a step counter or timestamp, must be equal on all "
         "ranks; take it from rank 0)")
        for v in votes if v.payload[0] != ident0)


# -- the in-flight marker: a rank whose state holds no DTensors must not save alone ------
#
# ``ckptstore.save`` takes the collective path only for a state with DTensors (or
# ``distributed=True``), because one rank saving a full state alone must not wait for the
# others. Every rank of a collective save therefore marks the path before it joins (and
# before the first save makes the coordination groups, which waits for every rank); a
# rank that took the single-process path (in a process group, ``distributed`` left to
# its default) and finds a fresh mark joins the collective save to fail it instead of
# committing its own checkpoint there, and refuses to commit if the mark appears later.
# A stale mark (older than the join timeout: that save cannot wait any longer) is ignored;
# it is a temp file, which ``ckptstore gc`` removes.
MARKER = TEMP_PREFIX + "collective-save"


def _claim(path: str | os.PathLike | Storage, storage_options: dict | None) -> Storage | None:
    """Mark ``path`` as the target of a collective save; the storage if this rank made
    the mark (it removes it after the join), None if another rank did."""
    storage = path if isinstance(path, Storage) else open_storage(path, storage_options)
    storage.makedirs()
    for attempt in range(2):
        try:
            storage.put_exclusive(MARKER, json.dumps({"since": time.time()}).encode())
            return storage
        except FileExistsError:
            if attempt or _marked(storage):
                return None
            _release(storage)  # stale: a crashed save's
    return None


def _release(storage: Storage) -> None:
    try:
        storage.remove(MARKER)
    except OSError:  # another rank removed it first, or the path is gone
        pass


def _marked(storage: Storage) -> bool:
    """A fresh mark of a collective save is at ``storage``."""
    try:
        since = float(json.loads(storage.read(MARKER))["since"])
    except FileNotFoundError:
        return False
    except (OSError, ValueError, KeyError, TypeError):  # e.g. being written right now
        try:
            since = storage.mtime(MARKER)
        except OSError:
            return False
    return time.time() - since < pc.join_timeout_seconds()


def in_process_group() -> bool:
    """A process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def collective_in_flight(storage: Storage) -> bool:
    """Whether other ranks of this job are saving to ``storage`` collectively (the
    single-process path of ``ckptstore.save`` must then join them, not save alone)."""
    return in_process_group() and _marked(storage)


def refuse_plain_commit(storage: Storage) -> None:
    """Raise instead of committing a single-rank checkpoint over a collective save in flight."""
    if collective_in_flight(storage):
        pc.abandon()  # the others' join fails without this rank: every rank rebuilds
        raise DistributedSaveError(_stray_message(dist.get_rank(), storage.url) +
                                   "; this rank's files were removed, nothing was committed",
                                   ((dist.get_rank(), "plan", "DistributedSaveError",
                                     "saved alone during a collective save"),))


def _stray_message(rank: int, path: str | os.PathLike | Storage) -> str:
    return (f"rank {rank}'s state holds no DTensors, so save() took the single-process path, "
            f"but the other ranks are saving to {_url(path)} collectively: pass "
            "distributed=True on every rank (or save a full state from one rank only, at "
            "another path)")
