"""``Checkpointer``: a training run's checkpoints across a local and a remote tier.

One save, in order::

    caller:      ckptstore.save(state, <primary>/step-NNNNNNNNNNNN, base=<previous step>)
                 -> handle                      (the stall ends here)
    background:  wait for the commit -> [memory: promote it to local disk, push it to
                 the peer] -> promote wanted steps to the remote tier (spawned process;
                 data, then the manifest, create-only) -> retention -> [memory eviction]

The primary tier is the memory tier when ``memory`` is on, else local when
``local_dir`` is given, else the remote one (docs/tiers.md). A background failure
is kept with its own type and raised once, by ``wait()`` or the next ``save()``; the
committed checkpoint stays whatever happens to its promotion.

Retention never deletes the newest committed step (and skips a round when that step
fails verification), a kept-best step, or a local step whose wanted promotion has
not committed. See docs/tiers.md.

Inside a process group of several ranks the Checkpointer is *collective*: every rank
calls ``save``, ``latest``, ``load``, ``wait`` and ``close`` together. Each rank writes
its own shards (docs/distributed.md); everything else that changes the run directory
(retiring a damaged step, retention, promotion) runs on rank 0 alone, and rank 0
decides what ``latest``/``load`` pick and broadcasts it, so ranks never diverge.
"""
from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import queue
import threading
from pathlib import Path
from typing import Any

from ckptstore.pipeline.handle import SaveHandle
from ckptstore.pipeline.options import SaveOptions
from ckptstore.runs import memory as mem
from ckptstore.runs.agreement import Agreement, world_size
from ckptstore.runs.chain import IncrementalChain
from ckptstore.runs.layout import step_name
from ckptstore.runs.memtier import MemoryTier, open_memory, release_memory, retire_damaged
from ckptstore.runs.recovery import (
    CheckpointFallbackWarning,
    Copies,
    fetch_shared,
    order,
    recover,
    warn,
)
from ckptstore.runs.replica import Replicator
from ckptstore.runs.retention import Best, Policy
from ckptstore.runs.tiers import Tier, prepare_step, repairing, retain, step_metadata, unpromoted
from ckptstore.storage import Storage, open_storage
from ckptstore.verify.checks import check_quick

log = logging.getLogger("ckptstore.checkpointer")
__all__ = ["CheckpointFallbackWarning", "Checkpointer"]


class Checkpointer:
    """Save every N steps, keep some locally and some remotely, resume from the
    newest intact checkpoint wherever it is.

    Args:
        local_dir: fast local directory, or None to use the remote tier alone.
        remote: fsspec URL of the durable tier (``s3://b/run``, ``gs://b/run``,
            ``file://...``), or None.
        storage_options: passed to fsspec for ``remote``.
        keep_last, keep_every, keep_best: local retention (``keep_best`` is
            ``(metric, "min"|"max", n)``; it also protects steps on a remote tier
            that has retention of its own).
        remote_keep_last, remote_keep_every: remote retention; both None keeps every
            promoted step. With only ``remote_keep_every``, only those steps are
            promoted.
        compression: as :func:`ckptstore.save` (``"auto"`` decides by the first tier);
            zstd by default, as incremental saves need compressed chunk files.
        incremental: skip chunks identical to the previous committed step's (the
            manifest references the older file). Only with compression.
        full_every: with ``incremental``, every ``full_every``-th save writes every
            chunk again (a full save), so no step depends on files older than that
            many saves (and the first save after a restart on an incremental step is
            full too). None: never (one old file may then back every later step).
        save_options: more keyword arguments for :func:`ckptstore.save`.
        distributed: collective use by every rank of the process group (see the
            module docstring). Default: when a process group of more than one rank
            is initialized. Pass False for the ``if rank == 0:`` pattern. Collective
            saves are never incremental (sharded saves do not support it yet).
        memory: True for a memory tier in node-local tmpfs (one directory per run in
            ``$CKPTSTORE_MEMORY_DIR`` or ``/dev/shm/ckptstore-<uid>``), or its directory.
            Saves commit there, are promoted in the background; a restart resumes
            from it. Collective: one tier per node, shared by its ranks (rank 0 owns
            it); ranks on several nodes are refused.
        memory_keep, memory_bytes: it keeps the newest ``memory_keep`` steps within
            ``memory_bytes`` (None: no cap), each until it is on the next tier.
        peer: ``"host:port"`` of a buddy's keeper (:mod:`ckptstore.peer`) that gets
            each memory step in the background and is a tier of ``load``.

    ``load`` sets ``loaded_step``, ``loaded_from`` (``"memory"``, ``"peer"``,
    ``"local"``, ``"remote"``) and ``load_timings`` (``(tier, seconds, outcome)``).
    """

    def __init__(self, local_dir: "str | os.PathLike | None", remote: str | None = None, *,
                 storage_options: dict | None = None, keep_last: int | None = 3,
                 keep_every: int | None = None, keep_best: Any = None,
                 remote_keep_last: int | None = None, remote_keep_every: int | None = None,
                 compression: str = "zstd", incremental: bool = True,
                 full_every: int | None = 10, save_options: dict | None = None,
                 distributed: bool | None = None, memory: "bool | str | os.PathLike" = False,
                 memory_keep: int = 1, memory_bytes: int | None = None,
                 peer: str | None = None) -> None:
        if local_dir is None and remote is None:
            raise ValueError("Checkpointer needs a local_dir, a remote URL, or both")
        best = Best.parse(keep_best)
        self.local: Tier | None = None
        self.remote: Tier | None = None
        self.memory: Tier | None = None
        self._replica: Replicator | None = None
        if local_dir is not None:
            self.local = Tier("local", open_storage(local_dir),
                              Policy(keep_last, keep_every, best))
        if remote is not None:
            if local_dir is None and remote_keep_last is None and remote_keep_every is None:
                remote_keep_last, remote_keep_every = keep_last, keep_every
            # keep_best protects steps on a remote that prunes; it never turns a remote
            # that keeps everything into one that keeps only the best and the newest
            prunes = remote_keep_last is not None or remote_keep_every is not None
            self.remote = Tier("remote", open_storage(remote, storage_options),
                               Policy(remote_keep_last, remote_keep_every,
                                      best if prunes else None))
        self.collective = world_size() > 1 if distributed is None else bool(distributed)
        if self.collective and world_size() < 1:
            raise ValueError("distributed=True needs an initialized torch.distributed process group")
        self._sync = Agreement(self.collective)
        self.coordinator = self._sync.coordinator
        #: the first durable tier: memory steps are promoted to it
        self.durable: Tier = self.local or self.remote  # type: ignore[assignment]
        self.memory_path: Path | None = None
        self._mem: MemoryTier | None = None
        self.memory_keep, self.memory_bytes = memory_keep, memory_bytes
        self.peer = peer
        self.peer_error: BaseException | None = None  #: the first failed peer push
        if memory or peer is not None:
            self._open_memory(memory, local_dir, remote)
        self.primary: Tier = self.memory or self.durable
        self.compression = SaveOptions(compression).for_storage(self.primary.root).compression
        self.incremental = incremental and self.compression != "none"
        self._chain = IncrementalChain(full_every)
        self.save_options = dict(save_options or {})
        self.loaded_step: int | None = None
        self.loaded_from: str | None = None
        self.load_timings: list[tuple[str, float, str]] = []
        self._last: SaveHandle | None = None  # the newest save
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._worker: threading.Thread | None = None
        self._promoter: cf.Executor | None = None
        self._closed = False

    def _open_memory(self, memory: Any, local_dir: Any, remote: str | None) -> None:
        if not memory:
            raise ValueError("peer= replicates the memory tier: pass memory=True (or a path) too")
        self._mem = open_memory(memory, local_dir, remote, self.memory_keep, self.memory_bytes,
                                self._sync)
        self.memory_path, self.memory = self._mem.path, self._mem.tier
        if self.peer is not None and self.coordinator:  # rank 0 pushes the node's steps
            self._replica = Replicator(self.peer, self.memory_path.name, self.memory.root,
                                       self._peer_failed)

    # -- context manager ------------------------------------------------------
    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            if self.collective:  # the other ranks may not be closing: no collective here
                self._wait_local()
                self._stop()
            else:
                self.close()
        except Exception:  # do not mask the exception that ended the block
            log.exception("error while closing the checkpointer")

    # -- save -----------------------------------------------------------------
    def save(self, step: int, state: Any, metrics: dict | None = None, **kwargs: Any):
        """Snapshot ``state`` as ``step`` and return its :class:`SaveHandle`
        (asynchronous, as :func:`ckptstore.save`; with a memory tier it completes
        once the step is committed in memory). ``metrics`` (JSON numbers) are
        stored in the manifest and drive ``keep_best``."""
        from ckptstore.api.save import save
        from ckptstore.distributed import wants_distributed_save

        if self._closed:
            raise RuntimeError("this Checkpointer is closed")
        name = step_name(step)
        self._settle()  # save() waits for it anyway; the base must be committed

        def prepare() -> None:
            self._raise_background()
            prepare_step(self.primary.root, step)

        self._sync.agree(prepare, f"preparing the save of step {step}")
        opts = {**self.save_options, **kwargs}
        if self.collective:
            opts["distributed"] = True  # every rank writes its part of one checkpoint
        sharded = wants_distributed_save(state, opts.get("distributed"))
        base = None
        if self.incremental and not sharded:
            base = self._chain.base_for(self.primary.root, self.primary.committed(), step)
            self._chain.saved(base)
        handle = save(state, self.primary.root.child(name), compression=self.compression,
                      metadata={"step": step, "metrics": metrics}, base=base, **opts)
        self._last = handle
        if self.coordinator:  # retention and promotion: rank 0 alone
            self._ensure_worker()
            self._queue.put((step, handle))
        return handle

    # -- queries --------------------------------------------------------------
    def steps(self) -> list[int]:
        """Every step committed on any own tier, ascending (not verified)."""
        return sorted({s for t in self._tiers() for s in t.committed()})

    def latest(self) -> int | None:
        """The newest step that is committed and passes verification (manifest
        checksum and structure, every file present at its size) on some tier, or
        None; a step the peer holds counts as committed there (its keeper commits
        manifest last; ``load`` verifies it). Chunk hashes are checked by ``load``,
        which falls back further. Collective: rank 0 decides, every rank gets its
        answer."""
        self._settle()
        return self._sync.agree(self._latest_here, "finding the latest step")

    def _latest_here(self) -> int | None:
        copies = self._copies()
        for step, tname in order(copies.committed(), copies.names(), "latest"):
            if tname == "peer":
                return step
            where = copies.locate(step, tname)
            problem = check_quick(where)
            if problem is None:
                return step
            warn(f"{tname} copy of step {step} ({where.url}) is unusable: {problem}")
        return None

    def load(self, step: "int | str" = "latest", *, into: Any = None, strict: bool = True,
             verify: bool = True, cast: bool = False) -> Any:
        """Load ``step`` (or the newest intact one) like :func:`ckptstore.load`.

        Copies are tried in the order own memory, peer, local, remote; a copy that
        fails verification is reported with a :class:`CheckpointFallbackWarning`
        and the next one is tried: another tier's copy of the same step, then (for
        ``"latest"``) older steps. A peer copy is fetched into the memory tier and
        loaded from there. ``loaded_step``, ``loaded_from`` and ``load_timings`` tell
        what was loaded, from where, and what each try cost. Tensors are copied into
        memory of their own, never maps of the run's files (retention and ``gc`` may
        remove or rewrite those).

        Collective: rank 0 lists the copies to try; each rank reads what it needs
        (its own boxes when ``into`` holds DTensors), and a copy is used only if it
        loaded on every rank, so all ranks return the same step.
        """
        from ckptstore.api.load import load

        load = repairing(load, self.local, None if self.collective else self.remote)  # docs/tiers.md
        self._settle()
        copies = self._copies()
        cands = self._sync.agree(lambda: order(copies.committed(), copies.names(), step),
                                 f"choosing step {step!r} to load")
        what = "any step" if step == "latest" else f"step {step}"
        fetched: set[str] = set()  # copies the fetch from the peer just verified, chunk by chunk

        def locate(s: int, tier: str) -> Storage:
            where = fetch_shared(copies, s, self._sync) if tier == "peer" else copies.locate(s, tier)
            if tier == "peer":
                fetched.add(where.url)
            return where

        got = recover(cands, locate,
                      lambda where: load(where, into=into, strict=strict, cast=cast,
                                         verify=verify and where.url not in fetched,
                                         mmap=self._maps(where)),
                      self._sync, what, " or ".join(t.root.url for t in self._tiers()))
        if self._mem is not None and self.coordinator:  # not tried again by later loads
            retire_damaged(self._mem, self.durable, got.attempts)
        self.loaded_step, self.loaded_from = got.step, got.tier
        self.load_timings = [(a.tier, a.seconds, a.outcome) for a in got.attempts]
        return got.value

    def _maps(self, where: Storage) -> bool:
        """Tensors loaded from the memory tier map its tmpfs pages (copy-on-write: no
        copy, only the hash check); retention unlinks files but never truncates them,
        so a map outlives an evicted step. Elsewhere no loaded tensor is a map (a load into
        DTensor targets may copy from a map of a cached file, dropped before it returns)."""
        return self.memory is not None and where.url.startswith(self.memory.root.url)

    def metadata(self, step: int) -> dict | None:
        """The ``{"step", "metrics"}`` stored with ``step`` (first tier that has it)."""
        return step_metadata(self._tiers(), step)

    # -- lifecycle ------------------------------------------------------------
    def wait(self) -> None:
        """Block until every save, promotion and retention pass has finished;
        raise the first background error (once). Collective."""
        last = self._last  # a sharded save ends alike on every rank (two-phase commit); its error once
        if last is not None and last.exception() is not None and (err := last.take_unobserved_error()):
            raise err  # here, or by the handle's own wait() or the next save(): never twice

        def settle() -> None:
            self._queue.join()
            self._raise_background()

        self._sync.agree(settle, "finishing background work")

    def _wait_local(self) -> None:
        """Wait for this process's own save and background work (no collective)."""
        self._settle()
        self._queue.join()

    def close(self) -> None:
        """``wait()`` and stop the background work; then promote what the memory tier
        alone holds and remove it (kept when that fails: it may hold the only copy).
        Collective."""
        if self._closed:
            return
        try:
            self.wait()
            if self.memory is not None:
                self._sync.agree(self._promote_down, "promoting the memory tier")
        finally:
            self._stop()
        if (m := self._mem) is not None:  # rank 0, once every rank is done with it
            self._sync.agree(lambda: release_memory(m, self.durable, self.peer),
                             "releasing the memory tier")

    def _stop(self) -> None:
        self._closed = True
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join()
            self._worker = None
        if self._promoter is not None:
            self._promoter.shutdown(wait=True)
            self._promoter = None
        if self._replica is not None:
            self._replica.close()

    # -- background -----------------------------------------------------------
    def _raise_background(self) -> None:
        with self._lock:
            err, self._error = self._error, None
        if err is not None:
            raise err

    def _peer_failed(self, err: BaseException) -> None:
        """A peer push failed: reported once (saves go on; the buddy has an older step)."""
        self.peer_error = err
        log.error("replication to the peer %s failed (%s: %s); saves go on without it, "
                  "later failures are logged as warnings", self.peer, type(err).__name__, err)

    def _ensure_worker(self) -> None:
        if self._worker is None:
            self._worker = threading.Thread(target=self._run, name="ckptstore-checkpointer",
                                            daemon=True)
            self._worker.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._after_save(*item)
            except BaseException as e:  # kept with its type; raised by wait()/save()
                log.error("background work after a save failed: %s", e)
                with self._lock:
                    if self._error is None:
                        self._error = e
            finally:
                self._queue.task_done()

    def _after_save(self, step: int, handle) -> None:
        if handle.exception() is not None:
            return  # the save's own error is raised by handle.wait() / the next save()
        if self._replica is not None:
            self._replica.offer(step)
        if self.memory is not None:
            self._promote_down()  # raises on failure: then nothing is evicted this round
        if self.local is not None and self.remote is not None:
            self._promote_wanted()  # raises on failure: then nothing is deleted this round
            self._retain(self.local, protected=unpromoted(self.local, self.remote))
            self._retain(self.remote)
        else:
            self._retain(self.durable)
        if self.memory is not None:
            mem.evict(self.memory.root, self.memory_keep, self.memory_bytes,
                      unpromoted(self.memory, self.durable),
                      self._replica.busy() if self._replica else frozenset())

    def _promote_down(self) -> None:
        """Promote the memory steps the first durable tier's policy wants and it lacks,
        newest first (not one its retention dropped: that would copy it back each round)."""
        assert self.memory is not None
        for s in sorted(unpromoted(self.memory, self.durable), reverse=True):
            self._promote(self.memory.root, self.durable.root, s)

    def _promote_wanted(self) -> None:
        for s in sorted(unpromoted(self.local, self.remote), reverse=True):  # type: ignore[arg-type]
            self._promote(self.local.root, self.remote.root, s)  # type: ignore[union-attr]

    def _promote(self, src: Storage, dst: Storage, step: int) -> None:
        from ckptstore.runs.promote import promote_step

        res = self._promotion_pool().submit(promote_step, src, dst, step_name(step)).result()
        log.info("step %d promoted to %s (%d bytes copied)", step, res.dst, res.uploaded_bytes)

    def _promotion_pool(self) -> cf.Executor:
        if self._promoter is None:
            if any(t.root.capabilities.process_local for t in self._tiers()):
                # per-process filesystem (memory://): upload from this process
                self._promoter = cf.ThreadPoolExecutor(1, thread_name_prefix="ckptstore-promote")
            else:
                from ckptstore.pipeline.writer import spawn_pool

                self._promoter = spawn_pool(1)
        return self._promoter

    def _retain(self, tier: Tier, protected: frozenset[int] | set[int] = frozenset()) -> None:
        retain(tier, protected)  # a method: tests count the rounds per rank

    def _settle(self) -> None:
        """Wait until this rank's previous save has committed: its commit thread uses
        the same gloo group as ``agree``, and two threads must never interleave
        collectives on one group."""
        last = self._last
        if last is not None:
            last.exception()

    # -- helpers --------------------------------------------------------------
    def _tiers(self) -> list[Tier]:
        return [t for t in (self.memory, self.local, self.remote) if t is not None]

    def _copies(self) -> Copies:
        """Where copies of steps are, in the recovery order (own memory, peer, local, remote)."""
        run = self.memory_path.name if self.memory_path is not None else None
        return Copies(tuple(self._tiers()), self.peer, run)
