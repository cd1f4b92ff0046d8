"""Writer processes: staged bytes -> chunks -> encode -> hash -> durable file.

The pool is spawned (never forked: the parent may hold CUDA state), started once and
reused. Each job writes one complete file through :class:`ckptstore.commit.AtomicFile`
and returns the chunk records; the parent writes the manifest after every job of a
save has succeeded. Workers exit when their parent dies (a watchdog polls the parent
pid), so a SIGKILLed trainer leaves no orphans; the pool's named semaphores are
unlinked as soon as every writer has opened them (``semaphores.py``), so a SIGKILL
of the whole group leaves nothing in ``/dev/shm`` either.

Pipeline state machine of one job::

    ATTACH (map arena) -> OPEN temp -> [HEADER] -> for each chunk: ENCODE -> HASH -> WRITE
    -> FSYNC -> RENAME -> FSYNC DIR -> DONE          (any error: temp removed, raised)

This module must not import torch: writers stay small and start fast.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import mmap
import multiprocessing as mp
import os
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from ckptstore.commit.atomic import AtomicFile
from ckptstore.manifest.records import ChunkRecord
from ckptstore.pipeline import codec, semaphores
from ckptstore.staging.ref import ArenaRef
from ckptstore.storage.base import Storage
from ckptstore.verify.checks import stored_problem

log = logging.getLogger("ckptstore.writer")


@dataclass(frozen=True, slots=True)
class BaseChunk:
    """A chunk of the base checkpoint of an incremental save, and the directory
    holding its file: reused only if its raw hash matches *and* its stored bytes
    are intact (a damaged base chunk is written again, never inherited)."""

    record: ChunkRecord
    where: Storage


@dataclass(frozen=True, slots=True)
class PieceJob:
    tensor: int
    first_chunk: int
    arena_offset: int
    length: int
    group: int
    #: this piece's chunks in the base checkpoint (incremental saves): a chunk
    #: whose bytes hash the same, and whose base copy is intact, is not written again
    prev: tuple[BaseChunk, ...] | None = None


@dataclass(frozen=True, slots=True)
class FileJob:
    """Everything a writer needs to produce one file."""

    storage: Storage
    name: str
    header: bytes
    arena: ArenaRef
    pieces: tuple[PieceJob, ...]
    chunk_size: int
    codec: str
    level: int


@dataclass(frozen=True, slots=True)
class ChunkResult:
    tensor: int
    index: int
    offset: int
    length: int
    raw_length: int
    group: int
    planes: tuple[tuple[str, int], ...]  #: (codec, stored length) of each byte plane
    hash: str
    raw_hash: str
    reused: bool = False  #: identical to the base checkpoint's chunk; not written


@dataclass(frozen=True, slots=True)
class FileResult:
    name: str
    size: int
    chunks: tuple[ChunkResult, ...]


_maps: dict[str, tuple[ArenaRef, mmap.mmap]] = {}


def _attach(ref: ArenaRef) -> memoryview:
    hit = _maps.get(ref.path)
    if hit is None or hit[0] != ref:
        if hit is not None:
            try:
                hit[1].close()
            except BufferError:
                pass
        fd = os.open(ref.path, os.O_RDONLY)
        try:
            mm = mmap.mmap(fd, ref.size, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        _maps[ref.path] = (ref, mm)
        hit = _maps[ref.path]
    return memoryview(hit[1])


def write_file(job: FileJob) -> FileResult:
    """Write one file (runs in a writer process).

    Uncompressed: the header, then the staged bytes in one held write (O_DIRECT
    requests in flight straight from the arena) while the chunks are hashed from
    the same memory. Compressed: chunks are encoded by :data:`ENCODE_THREADS`
    threads (the codecs release the GIL) and written in order."""
    arena = _attach(job.arena)
    results: list[ChunkResult] = []
    with AtomicFile(job.storage, job.name, bulk=True) as f:
        if job.header:
            f.write(job.header)
        pos = len(job.header)
        if job.codec == "raw":
            for lo, hi in _runs(job.pieces):  # the file's data: one run of staged memory
                f.write_held(arena[lo:hi])
            for piece in job.pieces:
                pos = _hash_raw(arena, piece, job.chunk_size, pos, results)
        else:
            for tasks in _batches(job, arena):
                for done in _encoded(tasks, job):
                    if isinstance(done, ChunkResult):  # reused from the base checkpoint
                        results.append(done)
                        continue
                    piece, index, raw_len, enc = done
                    for _, data in enc.planes:
                        f.write(data)
                    results.append(ChunkResult(
                        piece.tensor, piece.first_chunk + index, pos, enc.length, raw_len,
                        enc.group, tuple((c, len(d)) for c, d in enc.planes), enc.hash,
                        enc.raw_hash))
                    pos += enc.length
    del arena
    return FileResult(job.name, pos, tuple(results))


ENCODE_THREADS = 2  #: threads encoding the chunks of one compressed file
_BATCH = 8  #: chunks encoded ahead of the write (bounds the encoded bytes held)
_encoders: cf.ThreadPoolExecutor | None = None


def _runs(pieces: tuple[PieceJob, ...]) -> list[tuple[int, int]]:
    """The arena ranges holding ``pieces`` in order, adjacent ones merged (a file's
    pieces are staged back to back: one range, written with one held write)."""
    out: list[tuple[int, int]] = []
    for p in pieces:
        if not p.length:
            continue
        if out and out[-1][1] == p.arena_offset:
            out[-1] = (out[-1][0], p.arena_offset + p.length)
        else:
            out.append((p.arena_offset, p.arena_offset + p.length))
    return out


def _hash_raw(arena: memoryview, piece: PieceJob, chunk: int, pos: int,
              results: list[ChunkResult]) -> int:
    """Hash an uncompressed piece's chunks from the staged memory being written."""
    for i, start in enumerate(range(0, piece.length, chunk)):
        lo = piece.arena_offset + start
        raw = arena[lo:lo + min(chunk, piece.length - start)]
        h = codec.hash_bytes(raw)
        results.append(ChunkResult(piece.tensor, piece.first_chunk + i, pos, len(raw), len(raw),
                                   1, (("raw", len(raw)),), h, h))
        pos += len(raw)
    return pos


def _batches(job: FileJob, arena: memoryview):
    """The file's chunks as (piece, index, raw bytes), a few at a time."""
    batch: list[tuple[PieceJob, int, memoryview]] = []
    for piece in job.pieces:
        staged = arena[piece.arena_offset:piece.arena_offset + piece.length]
        for i, start in enumerate(range(0, piece.length, job.chunk_size)):
            batch.append((piece, i, staged[start:start + job.chunk_size]))
            if len(batch) == _BATCH:
                yield batch
                batch = []
    if batch:
        yield batch


def _encode_one(task: tuple[PieceJob, int, memoryview], job: FileJob):
    piece, i, raw = task
    if piece.prev is not None and i < len(piece.prev):
        h = codec.hash_bytes(raw)
        if h == piece.prev[i].record.raw_hash and _intact(piece.prev[i]):
            return ChunkResult(piece.tensor, piece.first_chunk + i, 0, 0, len(raw), piece.group,
                               (), "", h, True)
    return piece, i, len(raw), codec.encode_chunk(raw, piece.group, job.codec, job.level)


def _encoded(tasks: list[tuple[PieceJob, int, memoryview]], job: FileJob):
    """Encode ``tasks`` in parallel threads; results in order."""
    global _encoders
    if ENCODE_THREADS <= 1 or len(tasks) == 1:
        return [_encode_one(t, job) for t in tasks]
    if _encoders is None:
        _encoders = cf.ThreadPoolExecutor(ENCODE_THREADS, thread_name_prefix="ckptstore-encode")
    return list(_encoders.map(lambda t: _encode_one(t, job), tasks))


def _intact(b: BaseChunk) -> bool:
    """The base's stored copy of the chunk is there and matches its hash."""
    c = b.record
    try:
        data = b.where.read(c.file, c.offset, c.length)
    except (OSError, ValueError) as e:
        log.warning("incremental base chunk %s@%d unreadable (%s): writing it again",
                    c.file, c.offset, e)
        return False
    if stored_problem(data, c) is not None:
        log.warning("incremental base chunk %s@%d is damaged: writing it again", c.file, c.offset)
        return False
    return True


def _ping() -> int:
    return os.getpid()


def _watch_parent(ppid: int) -> None:
    while True:
        time.sleep(0.5)
        if os.getppid() != ppid:
            os._exit(1)


def writer_nice() -> int:
    """How much lower than the trainer's the writers' CPU priority is
    (``CKPTSTORE_WRITER_NICE``, 0-19; default 10): on a machine whose cores the
    training step keeps busy, background writes then take idle CPU first."""
    env = os.environ.get("CKPTSTORE_WRITER_NICE", "")
    try:
        value = int(env) if env.strip() else 10
    except ValueError:
        raise ValueError(f"CKPTSTORE_WRITER_NICE must be an integer 0-19, not {env!r}") from None
    return min(max(value, 0), 19)


def _init_worker(ppid: int, nice: int = 0) -> None:
    if nice:
        try:
            os.nice(nice)
        except OSError:  # not permitted here: run at the parent's priority
            pass
    threading.Thread(target=_watch_parent, args=(ppid,), daemon=True,
                     name="ckptstore-parent-watch").start()


def default_workers() -> int:
    env = os.environ.get("CKPTSTORE_WRITERS")
    if env:
        return max(1, int(env))
    return max(1, min(4, os.cpu_count() or 1))


_prep_lock = threading.Lock()


@contextlib.contextmanager
def _without_main_module():
    """Spawn children without importing the parent's ``__main__`` module."""
    import multiprocessing.spawn as spawn

    with _prep_lock:
        orig = spawn.get_preparation_data

        def prep(name: str) -> dict:
            d = orig(name)
            d.pop("init_main_from_path", None)
            d.pop("init_main_from_name", None)
            return d

        spawn.get_preparation_data = prep
        try:
            yield
        finally:
            spawn.get_preparation_data = orig


def spawn_pool(workers: int) -> cf.ProcessPoolExecutor:
    """A pool of ``workers`` spawned processes that exit with this one, all started
    now (so the first job does not pay for it) and without re-running the user's
    ``__main__`` (a training script that lacks an ``if __name__ == "__main__"``
    guard must not train twice)."""
    semaphores.clean_stale()  # names left by killed processes (see semaphores.py)
    pool = cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                                  initializer=_init_worker, initargs=(os.getpid(), writer_nice()))
    rec = semaphores.record(semaphores.pool_names(pool))
    with _without_main_module():
        launch = getattr(pool, "_launch_processes", None)
        if launch is not None:  # every writer now: a started pool never spawns again
            launch()
        futures = [pool.submit(_ping) for _ in range(workers)]
    for f in futures:
        f.result()
    procs = list(getattr(pool, "_processes", {}))
    if len(procs) == workers and getattr(pool, "_max_tasks_per_child", None) is None:
        semaphores.release(pool, procs, rec)
    # a process started by multiprocessing (mp.spawn, a Pool) exits through os._exit after
    # joining its children, without the hook that stops a pool's workers: stop them first,
    # and wait for it. Its finalizers run in priority order in this one thread, and the
    # pool's call queue has one of its own (priority 10) that ends the queue's feeder
    # thread: a shutdown that only signalled the pool's manager thread raced it, and the
    # stop message, queued after the feeder had gone, never reached the worker.
    import multiprocessing.util

    multiprocessing.util.Finalize(None, _stop_pool, args=(weakref.ref(pool),), exitpriority=50)
    return pool


def _stop_pool(ref: "weakref.ref[cf.ProcessPoolExecutor]") -> None:
    pool = ref()
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)


class WriterPool:
    """A lazily started, reusable pool of spawned writer processes."""

    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers or default_workers()
        self._pool: cf.ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def get(self) -> cf.ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = spawn_pool(self.workers)
            return self._pool

    def submit(self, fn: Callable[..., Any], *args: Any) -> cf.Future:
        """Submit a job. A pool found broken at submission (a writer died while idle:
        the OOM killer, an operator's kill) is replaced and the job submitted again;
        nothing of any save was lost. A writer that dies while running a job still
        fails that job (``BrokenProcessPool``)."""
        pool = self.get()
        try:
            return pool.submit(fn, *args)
        except BrokenProcessPool:
            log.warning("a writer process had died while idle; starting new writers")
            with self._lock:
                if self._pool is pool:
                    self._pool = None
            pool.shutdown(wait=True, cancel_futures=True)
            return self.get().submit(fn, *args)

    def start_async(self) -> None:
        """Start the writers in the background (e.g. while the first save stages)."""
        if self._pool is None and not self._lock.locked():
            threading.Thread(target=self.get, name="ckptstore-writer-start", daemon=True).start()

    def pids(self) -> list[int]:
        pool = self._pool
        return list(pool._processes) if pool is not None else []  # type: ignore[attr-defined]

    def reset(self) -> None:
        """Drop a broken pool (a worker died); the next save starts a new one."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def shutdown(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
