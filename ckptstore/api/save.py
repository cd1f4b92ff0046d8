"""``ckptstore.save``: snapshot into staging, hand files to writers, commit last.

Timeline of one save::

    caller thread:  check pending error -> wait for previous save (back-pressure)
                    -> plan -> for each file: alloc staging region -> copy -> submit
                    -> return handle            (the training stall ends here)
    commit thread:  wait for every file job -> write manifest (create-only) -> done
                    on error: wait for running jobs, remove written shards, keep error

The error of a save is raised by ``handle.wait()``; if nobody waited, by the next
``save()``, exactly once, with its original type and traceback. The stages are
those of :mod:`ckptstore.pipeline.pipeline`, shared with distributed and DCP saves.
"""
from __future__ import annotations

import logging
import os
import secrets
import time
from typing import Any

from ckptstore import manifest as fmt
from ckptstore.commit.atomic import commit_manifest, manifest_visible
from ckptstore.distributed.dsave import collective_in_flight, refuse_plain_commit, save as distributed_save
from ckptstore.distributed.shards import wants_distributed_save
from ckptstore.errors import CheckpointExistsError
from ckptstore.manifest import builder
from ckptstore.manifest.io import read_manifest
from ckptstore.pipeline.engine import engine, shutdown
from ckptstore.pipeline.handle import SaveHandle, SaveResult
from ckptstore.pipeline.options import DEFAULT_CHUNK, DEFAULT_SHARD, SaveOptions, check_importable, check_metadata
from ckptstore.pipeline.pipeline import PrevChunks, SavePipeline
from ckptstore.pipeline.writer import BaseChunk
from ckptstore.plan.layout import SavePlan
from ckptstore.plan.stateful import resolve_stateful
from ckptstore.plan.tree import flatten
from ckptstore.storage import Storage, open_storage
from ckptstore.storage.preflight import check_writable

log = logging.getLogger("ckptstore")

__all__ = ["save", "shutdown", "SaveHandle", "SaveResult"]

def save(state: Any, path: str | os.PathLike | Storage, *, compression: str = "auto",
         blocking: bool = False, metadata: Any = None, zstd_level: int = 1,
         byte_grouping: bool = True, staging_budget: int | None = None,
         chunk_size: int = DEFAULT_CHUNK, shard_size: int = DEFAULT_SHARD,
         if_busy: str = "wait", overwrite: bool = False,
         storage_options: dict | None = None, base: str | None = None,
         distributed: bool | None = None, overlap: bool = False) -> SaveHandle:
    """Snapshot ``state`` and write it to ``path`` in the background.

    Returns once every tensor is copied into staging memory; training may then
    mutate the tensors. ``handle.wait()`` blocks until the checkpoint is durable and
    committed (the manifest, written last, is the commit).

    With ``overlap=True``, ``save()`` returns as soon as the device-to-host copies
    of CUDA tensors are queued (host memory is still copied before it returns): the
    current CUDA stream of each device is made to wait for the copies, so the next
    kernel queued on it (e.g. the optimizer step) cannot overwrite a parameter
    before it was copied. Changing the tensors any other way (another stream, a
    host write) must wait for ``handle.wait_staged()``.

    Args:
        state: nested dict/list/tuple of tensors, numpy arrays, plain values (see
            docs/format.md for every type), and Stateful objects (modules,
            optimizers, schedulers, :class:`ckptstore.RNGState`, anything with
            ``state_dict()``/``load_state_dict()``), stored as their ``state_dict()``.
        path: a local directory, ``file://`` or fsspec URL, or a Storage.
        compression: ``"auto"`` (the default: ``"none"`` on local file systems,
            ``"zstd"`` on object stores; see ``auto_compression``), ``"zstd"``,
            ``"lz4"`` or ``"none"`` (shards are then plain safetensors files). The
            manifest records what was used.
        blocking: wait for the commit before returning.
        metadata: JSON-serialisable user metadata stored in the manifest.
        zstd_level: zstd level (1 is as good as 3 on float data and twice as fast).
        byte_grouping: split 2/4-byte float elements into byte planes before compressing.
        staging_budget: cap on staging memory in bytes; the state is then pipelined
            through a ring of that size and the stall grows towards
            state size / write speed. Default: staging as large as the state.
        chunk_size, shard_size: chunk (hash/codec unit) and target file sizes.
        if_busy: ``"wait"`` for a previous save's staging, or ``"raise"``
            :class:`StagingBusyError`.
        overwrite: replace an existing checkpoint at ``path`` (atomically).
        base: incremental save: the name of a committed sibling checkpoint (same
            parent directory); chunks whose bytes equal that checkpoint's chunk of the
            same tensor are not written again, the manifest references its file.
            Only for compressed saves (plain safetensors shards must be whole).
        distributed: collective save by every rank of the process group (each writes
            its own shards, rank 0 commits; see docs/distributed.md). Default: when
            ``state`` holds DTensors.
        overlap: return once device copies are queued, not completed (see above).
    """
    opts = SaveOptions(compression, zstd_level, byte_grouping, staging_budget, chunk_size,
                       shard_size, if_busy, overwrite)
    check_metadata(metadata)
    state = resolve_stateful(state)  # modules, optimizers, ...: what their state_dict() holds
    if wants_distributed_save(state, distributed):
        if base is not None:
            raise ValueError("incremental saves (base=...) are not supported for distributed saves")
        return distributed_save(state, path, opts, metadata=metadata, blocking=blocking,
                                storage_options=storage_options, overlap=overlap)
    storage = open_storage(path, storage_options)
    if distributed is None and collective_in_flight(storage):  # the others hold DTensors
        return distributed_save(state, path, opts, metadata=metadata, blocking=blocking,
                                storage_options=storage_options, stray=True)
    check_importable(storage)
    check_writable(storage)
    opts = opts.for_storage(storage)
    eng = engine()
    with eng.admit(if_busy):
        if not overwrite and storage.exists(fmt.MANIFEST_NAME):
            raise CheckpointExistsError(
                f"{storage.url} already holds a committed checkpoint; save to a new path "
                "or pass overwrite=True")
        handle = SaveHandle(storage.url)
        t0 = time.perf_counter()
        skeleton, leaves = flatten(state)
        save_id = secrets.token_hex(6)
        pipe = SavePipeline(eng, storage, opts)
        prev = _base_manifest(storage, base) if base and opts.codec != "raw" else None
        plan = pipe.plan(leaves, save_id, cached=True)
        staged = pipe.stage(leaves, plan, overlap=overlap,
                            prev=_prev_chunks(plan, prev, storage, base) if prev is not None else None)
        handle.copies_pending(staged.wait_copied)
        handle.staged_seconds = time.perf_counter() - t0

        def finish() -> SaveResult:
            data: bytes | None = None
            try:
                written = pipe.written(staged)
                tensors, files = builder.file_records(written, prev, base)
                manifest = builder.assemble(
                    save_id=save_id, chunk_size=written.plan.chunk_size, compression=opts.compression,
                    metadata=metadata, tree=skeleton, tensors=tensors, files=files)
                data = fmt.encode(manifest)  # kept to tell, on error, whether it landed anyway
                if distributed is None:  # never over a collective save begun meanwhile
                    refuse_plain_commit(storage)
                commit_manifest(storage, manifest, overwrite=overwrite, data=data)
            except BaseException:
                if not manifest_visible(storage, data):  # else removing shards would tear it
                    pipe.discard(staged.files)
                raise
            return SaveResult(storage.url, save_id, written.plan.nbytes, written.stored_bytes,
                              len(written.results), handle.staged_seconds,
                              time.perf_counter() - t0)

        eng.complete(handle, finish)
    if blocking:
        handle.wait()
    return handle

def _base_manifest(storage: Storage, base: str) -> fmt.Manifest | None:
    """The committed manifest of sibling checkpoint ``base``, or None (full save)."""
    try:
        return read_manifest(storage.sibling(base))
    except (OSError, ValueError) as e:  # unreadable base: write everything, say why
        log.warning("incremental base %s unusable, saving in full: %s", base, e)
        return None

def _prev_chunks(plan: SavePlan, prev: fmt.Manifest, storage: Storage, base: str | None) -> PrevChunks:
    """{tensor id: the same tensor's chunks in ``prev``, with the directory of each
    chunk's file} for tensors with the same name, kind, dtype and shape (and the
    same chunk size). Writers reuse a chunk only if its base copy is intact."""
    if prev.chunk_size != plan.chunk_size or base is None:
        return {}
    by_name = {t.name: t for t in prev.tensors}
    files = {f.name: f for f in prev.files}
    dirs: dict[str, Storage] = {}

    def where(file: str) -> Storage:
        d = files[file].base or base
        if d not in dirs:
            dirs[d] = storage.sibling(d)
        return dirs[d]

    out = {}
    for t in plan.tensors:
        r = by_name.get(t.name)
        if (r is not None and r.kind == t.kind and r.dtype == t.dtype
                and tuple(r.shape) == tuple(t.shape) and len(r.chunks) == t.nchunks):
            out[t.id] = tuple(BaseChunk(c, where(c.file)) for c in r.chunks)
    return out
