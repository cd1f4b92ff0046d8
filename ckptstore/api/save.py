"""``ckptstore.save``: snapshot into staging, hand files to writers, commit last.

Timeline of one save::

    caller thread:  check pending error -> wait for previous save (back-pressure)
                    -> plan -> for each file: alloc staging region -> copy -> submit
                    -> return handle            (the training stall ends here)
    commit thread:  wait for every file job -> write manifest (create-only) -> done
                    on error: wait for running jobs, remove written shards, keep error

The error of a save is raised by ``handle.wait()``; if nobody waited, by the next
``save()``, exactly once, with its original type and traceback.
"""
from __future__ import annotations

import atexit
import concurrent.futures as cf
import ctypes
import dataclasses
import datetime as _dt
import json
import logging
import multiprocessing.util
import os
import platform
import secrets
import threading
import time
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import torch

from ckptstore import __version__, manifest as fmt
from ckptstore.commit.atomic import commit_manifest
from ckptstore.errors import (
    CheckpointExistsError,
    CkptTimeoutError,
    StagingBusyError,
    UnsupportedTypeError,
    WriterDiedError,
)
from ckptstore.pipeline.writer import FileJob, FileResult, PieceJob, WriterPool, write_file
from ckptstore.plan.layout import FilePlan, SavePlan, make_plan
from ckptstore.plan.tree import flatten
from ckptstore.staging.arena import Ring, StagingPool
from ckptstore.storage import Storage, open_storage

log = logging.getLogger("ckptstore")

COMPRESSION = ("zstd", "lz4", "none")
DEFAULT_CHUNK = 16 << 20
DEFAULT_SHARD = 64 << 20  # small enough that writers start while later shards stage


@dataclass(frozen=True, slots=True)
class SaveResult:
    """What a committed save wrote."""

    path: str
    save_id: str
    logical_bytes: int
    stored_bytes: int
    files: int
    staged_seconds: float
    total_seconds: float


class SaveHandle:
    """A save in flight. ``wait()`` returns a :class:`SaveResult` once the
    checkpoint is durable and committed, or raises the writer's original error."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._done = threading.Event()
        self._result: SaveResult | None = None
        self._error: BaseException | None = None
        self._observed = False
        self.staged_seconds = 0.0

    def done(self) -> bool:
        """True once the save committed or failed."""
        return self._done.is_set()

    def wait_staged(self) -> None:
        """Return once the state is copied out (``save`` already guarantees this)."""
        return None

    def wait(self, timeout: float | None = None) -> SaveResult:
        """Block until durable and committed; raise the background error if any."""
        if not self._done.wait(timeout):
            raise CkptTimeoutError(f"save to {self.path} still running after {timeout}s")
        if self._error is not None:
            self._observed = True
            raise self._error
        assert self._result is not None
        return self._result

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Block until the save ends and return its error, or None if it committed
        (as ``concurrent.futures.Future.exception``). The error is not consumed:
        ``wait()`` or the next ``save()`` still raises it once."""
        if not self._done.wait(timeout):
            raise CkptTimeoutError(f"save to {self.path} still running after {timeout}s")
        return self._error

    def _finish(self, result: SaveResult | None, error: BaseException | None) -> None:
        self._result, self._error = result, error
        self._done.set()

    def _take_unobserved_error(self) -> BaseException | None:
        if self._done.is_set() and self._error is not None and not self._observed:
            self._observed = True
            return self._error
        return None


class Engine:
    """Process-wide state: writer pool, staging memory, the save in flight."""

    def __init__(self) -> None:
        self.writers = WriterPool()
        self.staging = StagingPool(pin=True)
        self.last: SaveHandle | None = None
        self.lock = threading.Lock()

    def close(self) -> None:
        last = self.last
        if last is not None:
            last.exception()
        self.writers.shutdown()
        self.staging.close()


_engine: Engine | None = None
_engine_lock = threading.Lock()


def engine() -> Engine:
    global _engine
    with _engine_lock:
        if _engine is None:
            _engine = Engine()
            atexit.register(_shutdown)
            # A multiprocessing child (e.g. a rank started by torch.multiprocessing.spawn)
            # exits through os._exit without atexit hooks, after joining its children:
            # our writers must be stopped first or that join waits forever.
            multiprocessing.util.Finalize(None, _shutdown, exitpriority=100)
        return _engine


def shutdown() -> None:
    """Wait for the save in flight, stop the writer processes and free staging memory.

    Runs by itself at interpreter exit; call it explicitly where ``atexit`` hooks do
    not run (e.g. processes started by ``torch.multiprocessing.spawn``). A later
    ``save()`` starts a new engine."""
    _shutdown()


def _shutdown() -> None:
    global _engine
    e, _engine = _engine, None
    if e is not None:
        try:
            e.close()
        except Exception:  # interpreter exit: nothing left to report to
            log.debug("error while shutting down ckptstore", exc_info=True)


def save(state: Any, path: "str | os.PathLike | Storage", *, compression: str = "zstd",
         blocking: bool = False, metadata: Any = None, zstd_level: int = 1,
         byte_grouping: bool = True, staging_budget: int | None = None,
         chunk_size: int = DEFAULT_CHUNK, shard_size: int = DEFAULT_SHARD,
         if_busy: str = "wait", overwrite: bool = False,
         storage_options: dict | None = None, base: str | None = None,
         distributed: bool | None = None) -> SaveHandle:
    """Snapshot ``state`` and write it to ``path`` in the background.

    Returns once every tensor is copied into staging memory; training may then
    mutate the tensors. ``handle.wait()`` blocks until the checkpoint is durable and
    committed (the manifest, written last, is the commit).

    Args:
        state: nested dict/list/tuple of tensors, numpy arrays and plain values.
        path: a local directory, ``file://`` or fsspec URL, or a Storage.
        compression: ``"zstd"``, ``"lz4"`` or ``"none"`` (shards are then plain
            safetensors files).
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
    """
    from ckptstore.distributed import wants_distributed_save

    if wants_distributed_save(state, distributed):
        if base is not None:
            raise ValueError("incremental saves (base=...) are not supported for distributed saves")
        from ckptstore.distributed.dsave import save as distributed_save

        return distributed_save(state, path, compression=compression, blocking=blocking,
                                metadata=metadata, zstd_level=zstd_level,
                                byte_grouping=byte_grouping, staging_budget=staging_budget,
                                chunk_size=chunk_size, shard_size=shard_size, if_busy=if_busy,
                                overwrite=overwrite, storage_options=storage_options)
    check_save_args(compression=compression, if_busy=if_busy, chunk_size=chunk_size,
                    metadata=metadata)
    storage = open_storage(path, storage_options)
    check_importable(storage)
    eng = engine()
    with eng.lock:
        prev = eng.last
        if prev is not None:
            if not prev.done() and if_busy == "raise":
                raise StagingBusyError(
                    f"the previous save to {prev.path} is still writing; wait for it or "
                    "use if_busy='wait'")
            prev.exception()
            err = prev._take_unobserved_error()
            if err is not None:
                raise err
        if not overwrite and storage.exists(fmt.MANIFEST_NAME):
            raise CheckpointExistsError(
                f"{storage.url} already holds a committed checkpoint; save to a new path "
                "or pass overwrite=True")
        handle = SaveHandle(storage.url)
        eng.writers.start_async()  # the first save overlaps writer start-up with staging
        t0 = time.perf_counter()
        skeleton, leaves = flatten(state)
        save_id = secrets.token_hex(6)
        codec = "raw" if compression == "none" else compression
        if staging_budget is not None:  # two files in flight fit in the budget
            shard_size = max(chunk_size, min(shard_size, int(staging_budget) // 2))
        plan = _cached_plan(leaves, chunk_size=chunk_size, shard_size=shard_size,
                            compressed=codec != "raw", byte_grouping=byte_grouping,
                            save_id=save_id)
        prev = _base_manifest(storage, base) if base and codec != "raw" else None
        prev_hashes = _prev_hashes(plan, prev) if prev is not None else {}
        capacity = sum(-(-f.nbytes // 4096) * 4096 for f in plan.files)
        if staging_budget is not None:
            capacity = min(capacity, max(int(staging_budget), max((f.nbytes for f in plan.files), default=0)))
        arena = eng.staging.ensure(capacity)
        ring = Ring(arena.size)
        storage.makedirs()
        futures: list[tuple[FilePlan, cf.Future]] = []
        try:
            for fp in plan.files:
                futures.append((fp, _stage_and_submit(eng.writers, storage, arena, ring, fp, plan,
                                                      leaves, codec, zstd_level, prev_hashes)))
        except BaseException as e:
            _cleanup(storage, futures, ring)
            if isinstance(e, BrokenProcessPool):
                eng.writers.reset()
                raise WriterDiedError(f"a writer process died while staging {storage.url}") from e
            raise
        handle.staged_seconds = time.perf_counter() - t0
        meta = dict(skeleton=skeleton, metadata=metadata, plan=plan, save_id=save_id,
                    compression=compression, prev=prev, base=base)
        threading.Thread(target=_commit, args=(eng, storage, futures, ring, handle, meta, t0,
                                               overwrite),
                         name="ckptstore-commit", daemon=True).start()
        eng.last = handle
    if blocking:
        handle.wait()
    return handle


def _base_manifest(storage: Storage, base: str) -> "fmt.Manifest | None":
    """The committed manifest of sibling checkpoint ``base``, or None (full save)."""
    from ckptstore.manifest.io import read_manifest

    try:
        return read_manifest(storage.sibling(base))
    except (OSError, ValueError) as e:  # unreadable base: write everything, say why
        log.warning("incremental base %s unusable, saving in full: %s", base, e)
        return None


def _prev_hashes(plan: SavePlan, prev: "fmt.Manifest") -> dict[int, tuple]:
    """{tensor id: raw hashes of the same tensor's chunks in ``prev``} for tensors
    with the same name, kind, dtype and shape (and the same chunk size)."""
    if prev.chunk_size != plan.chunk_size:
        return {}
    by_name = {t.name: t for t in prev.tensors}
    out = {}
    for t in plan.tensors:
        r = by_name.get(t.name)
        if (r is not None and r.kind == t.kind and r.dtype == t.dtype
                and tuple(r.shape) == tuple(t.shape) and len(r.chunks) == t.nchunks):
            out[t.id] = tuple(c.raw_hash for c in r.chunks)
    return out


def _piece_prev(prev_hashes: dict | None, p, chunk_size: int) -> tuple | None:
    hashes = (prev_hashes or {}).get(p.tensor)
    if hashes is None:
        return None
    return hashes[p.first_chunk:p.first_chunk + -(-p.length // chunk_size)]


def _byte_view(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a contiguous tensor as a 1-D uint8 tensor (no copy)."""
    n = t.numel() * t.element_size()
    out = torch.empty(0, dtype=torch.uint8, device=t.device)
    return out.set_(t.untyped_storage(), t.storage_offset() * t.element_size(), (n,), (1,))


def _source_bytes(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        t = value.detach()
        if not t.is_contiguous():
            t = t.contiguous()
        return _byte_view(t)
    import numpy as np

    a = np.ascontiguousarray(value)
    return torch.from_numpy(a.reshape(-1).view(np.uint8)) if a.size else torch.empty(0, dtype=torch.uint8)


def check_save_args(*, compression: str, if_busy: str, chunk_size: int, metadata: Any) -> None:
    """Refuse bad arguments before anything is staged or written."""
    if compression not in COMPRESSION:
        raise ValueError(f"compression must be one of {COMPRESSION}, not {compression!r}")
    if if_busy not in ("wait", "raise"):
        raise ValueError(f"if_busy must be 'wait' or 'raise', not {if_busy!r}")
    if chunk_size <= 0 or chunk_size % 64:
        raise ValueError("chunk_size must be a positive multiple of 64")
    try:
        json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise UnsupportedTypeError(f"metadata must be plain JSON: {e}") from None


def check_importable(storage: Storage) -> None:
    """Refuse a Storage (or a Storage it wraps) whose class is defined in ``__main__``:
    writer processes are spawned without re-running the caller's script, so they
    could not unpickle it and would die with the cause only on their stderr."""
    seen: set[int] = set()
    todo: list[Any] = [storage]
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        cls = type(obj)
        if cls.__module__ == "__main__":
            raise UnsupportedTypeError(
                f"storage class {cls.__qualname__} is defined in __main__; writer processes "
                "do not run the calling script, so they cannot load it: define it in an "
                "importable module")
        todo.extend(v for v in getattr(obj, "__dict__", {}).values() if isinstance(v, Storage))


_plan_cache: dict = {}


def _cached_plan(leaves, *, save_id: str, **params) -> SavePlan:
    """``make_plan``, reusing the previous save's layout when the tree has the same
    leaves (paths, kinds, dtypes, shapes): the steady state of a training run, where
    planning hundreds of tensors would otherwise add to every stall. Only the save id
    (in file names and safetensors headers) differs between saves."""
    sig = (tuple((leaf.path, _leaf_sig(leaf.value)) for leaf in leaves),
           tuple(sorted(params.items())))
    hit = _plan_cache.get(sig)
    if hit is None:
        plan = make_plan(leaves, save_id=save_id, **params)
        _plan_cache.clear()
        _plan_cache[sig] = (plan, save_id)
        return plan
    plan, old = hit
    tag_old, tag_new = f'"save_id":"{old}"'.encode(), f'"save_id":"{save_id}"'.encode()
    files = tuple(dataclasses.replace(f, name=f.name.replace(old, save_id),
                                      header=f.header.replace(tag_old, tag_new))
                  for f in plan.files)
    return dataclasses.replace(plan, files=files)


def _leaf_sig(value: Any) -> tuple:
    if isinstance(value, torch.Tensor):
        return ("t", value.dtype, tuple(value.shape))
    return ("n", value.dtype.str, value.shape)


def _host_pointer(value: Any) -> tuple[Any, int]:
    """A C-contiguous host object holding ``value``'s bytes, and its address (the
    object must stay referenced while the address is used)."""
    if isinstance(value, torch.Tensor):
        t = value.detach()
        if not t.is_contiguous():
            t = t.contiguous()
        return t, t.data_ptr()
    import numpy as np

    a = np.ascontiguousarray(value)
    return a, a.ctypes.data


def _stage_and_submit(writers: WriterPool, storage, arena, ring, fp: FilePlan, plan: SavePlan, leaves,
                      codec: str, level: int, prev_hashes: dict | None = None) -> cf.Future:
    offset, region = ring.alloc(fp.nbytes)
    side = None
    base = arena.tensor.data_ptr()
    for p in fp.pieces:
        if not p.length:
            continue
        value = leaves[p.tensor].value
        at = offset + p.offset
        if isinstance(value, torch.Tensor) and value.device.type != "cpu":
            src = _source_bytes(value)[p.start:p.start + p.length]
            dst = arena.tensor[at:at + p.length]
            if src.is_cuda:
                if side is None:  # D2H copies on a side stream, ordered after pending compute
                    side = _side_stream(src.device)
                    side.wait_stream(torch.cuda.current_stream(src.device))
                with torch.cuda.stream(side):
                    dst.copy_(src, non_blocking=arena.pinned)
            else:
                dst.copy_(src)
        else:
            # Host memory: one memcpy, on this thread, with the GIL released. torch's
            # copy_ fans out to OpenMP threads, which on a busy machine (training,
            # writers) made the stall 4-12x slower than a plain memcpy.
            src_obj, src_ptr = _host_pointer(value)
            ctypes.memmove(base + at, src_ptr + p.start, p.length)
            del src_obj
    pieces = tuple(PieceJob(p.tensor, p.first_chunk, offset + p.offset, p.length,
                            plan.tensors[p.tensor].group,
                            _piece_prev(prev_hashes, p, plan.chunk_size)) for p in fp.pieces)
    job = FileJob(storage, fp.name, fp.header, arena.ref, pieces, plan.chunk_size, codec, level)
    fut = writers.get().submit(write_file, job)  # get() waits for a pool still starting
    fut.add_done_callback(lambda _f: ring.free(region))
    return fut


_side_streams: dict = {}


def _side_stream(device: torch.device) -> "torch.cuda.Stream":
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device=device)
    return _side_streams[device]


def _cleanup(storage: Storage, futures, ring: Ring) -> None:
    """After a failure: let running jobs end (they read staging), remove their files."""
    for _, f in futures:
        f.cancel()
    for fp, f in futures:
        try:
            f.result()
        except BaseException:
            pass
        try:
            storage.remove(fp.name)
        except Exception:
            pass


def _commit(eng: Engine, storage: Storage, futures, ring: Ring, handle: SaveHandle, meta: dict,
            t0: float, overwrite: bool) -> None:
    data: bytes | None = None
    try:
        results: dict[str, FileResult] = {}
        for fp, f in futures:
            results[fp.name] = f.result()
        manifest = _manifest(meta, results)
        data = fmt.encode(manifest)  # kept to tell, on error, whether it landed anyway
        commit_manifest(storage, manifest, overwrite=overwrite)
        stored = sum(r.size for r in results.values())
        handle._finish(SaveResult(storage.url, meta["save_id"], meta["plan"].nbytes, stored,
                                  len(results), handle.staged_seconds,
                                  time.perf_counter() - t0), None)
        log.debug("committed %s (%d bytes)", storage.url, stored)
    except BaseException as e:  # kept with its own type; raised by wait() or next save()
        if not _manifest_visible(storage, data):  # else removing shards would tear it
            _cleanup(storage, futures, ring)
        if isinstance(e, BrokenProcessPool):
            eng.writers.reset()
            err: BaseException = WriterDiedError(
                f"a writer process died while writing {storage.url}; nothing was committed")
            err.__cause__ = e
            e = err
        log.error("save to %s failed: %s", storage.url, e)
        handle._finish(None, e)


def _manifest_visible(storage: Storage, data: bytes | None) -> bool:
    """Whether our manifest may be in place although the commit reported an error
    (e.g. the directory fsync after the link failed); unknown counts as yes."""
    if data is None:
        return False
    try:
        return storage.read(fmt.MANIFEST_NAME) == data
    except FileNotFoundError:
        return False
    except Exception:
        return True


def _manifest(meta: dict, results: dict[str, FileResult]) -> fmt.Manifest:
    plan: SavePlan = meta["plan"]
    chunks: list[list] = [[None] * t.nchunks for t in plan.tensors]
    prev: fmt.Manifest | None = meta.get("prev")
    prev_recs = {t.name: t for t in prev.tensors} if prev is not None else {}
    linked: dict[str, fmt.FileRecord] = {}
    for r in results.values():
        for c in r.chunks:
            if c.reused:  # the base checkpoint's chunk, in whichever step holds its file
                old = prev_recs[plan.tensors[c.tensor].name].chunks[c.index]
                f = prev.file(old.file)
                linked[f.name] = fmt.FileRecord(f.name, f.size, f.format, f.header_length,
                                                f.header_hash, f.base or meta["base"])
                chunks[c.tensor][c.index] = old
                continue
            chunks[c.tensor][c.index] = fmt.ChunkRecord(
                r.name, c.offset, c.length, c.raw_length, c.group, c.planes, c.hash, c.raw_hash)
    tensors = []
    for t in plan.tensors:
        cs = tuple(chunks[t.id])
        assert all(c is not None for c in cs), f"missing chunks for {t.name}"
        tensors.append(fmt.TensorRecord(t.name, t.kind, t.dtype, t.shape, t.nbytes,
                                        fmt.digest_of([c.raw_hash for c in cs]), cs))
    files = tuple(fmt.FileRecord(fp.name, results[fp.name].size, fp.format, len(fp.header),
                                 fmt.hash_bytes(fp.header)) for fp in plan.files)
    files += tuple(linked[n] for n in sorted(linked))
    return fmt.Manifest(
        schema_version=fmt.SCHEMA_VERSION,
        writer={"library": "ckptstore", "version": __version__, "torch": torch.__version__,
                "python": platform.python_version()},
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        save_id=meta["save_id"], chunk_size=plan.chunk_size, compression=meta["compression"],
        metadata=meta["metadata"], tree=meta["skeleton"], tensors=tuple(tensors), files=files)
