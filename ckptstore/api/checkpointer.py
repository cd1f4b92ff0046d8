"""``Checkpointer``: a training run's checkpoints across a local and a remote tier.

One save, in order::

    caller:      ckptstore.save(state, <primary>/step-NNNNNNNNNNNN, base=<previous step>)
                 -> handle                      (the stall ends here)
    background:  wait for the local commit -> local retention
                 -> promote wanted steps to the remote tier (spawned process; data
                    objects, then the manifest, create-only) -> remote retention

The primary tier is local when ``local_dir`` is given, else the remote one. A
background failure is kept with its own type and raised once, by ``wait()`` or the
next ``save()``; the local checkpoint stays whatever happens to its promotion.

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
import warnings
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from ckptstore import errors as _errors
from ckptstore.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    DistributedSaveError,
    SchemaVersionError,
    StorageError,
)
from ckptstore.pipeline.handle import SaveHandle
from ckptstore.pipeline.options import SaveOptions
from ckptstore.runs.chain import IncrementalChain
from ckptstore.runs.layout import step_name
from ckptstore.runs.retention import Best, Policy
from ckptstore.runs.tiers import Tier, candidates, prepare_step, repairing, retain, step_metadata, unpromoted
from ckptstore.storage import open_storage
from ckptstore.verify.checks import check_quick

log = logging.getLogger("ckptstore.checkpointer")


class CheckpointFallbackWarning(UserWarning):
    """A copy of a checkpoint failed verification; an older or other copy was used."""


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
    """

    def __init__(self, local_dir: "str | os.PathLike | None", remote: str | None = None, *,
                 storage_options: dict | None = None, keep_last: int | None = 3,
                 keep_every: int | None = None, keep_best: Any = None,
                 remote_keep_last: int | None = None, remote_keep_every: int | None = None,
                 compression: str = "zstd", incremental: bool = True,
                 full_every: int | None = 10, save_options: dict | None = None,
                 distributed: bool | None = None) -> None:
        if local_dir is None and remote is None:
            raise ValueError("Checkpointer needs a local_dir, a remote URL, or both")
        best = Best.parse(keep_best)
        self.local: Tier | None = None
        self.remote: Tier | None = None
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
        self.primary: Tier = self.local or self.remote  # type: ignore[assignment]
        self.compression = SaveOptions(compression).for_storage(self.primary.root).compression
        self.incremental = incremental and self.compression != "none"
        self._chain = IncrementalChain(full_every)
        self.save_options = dict(save_options or {})
        self.loaded_step: int | None = None
        self._last: SaveHandle | None = None  # the newest save
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._worker: threading.Thread | None = None
        self._promoter: cf.Executor | None = None
        self._closed = False
        self.collective = _world_size() > 1 if distributed is None else bool(distributed)
        if self.collective and _world_size() < 1:
            raise ValueError("distributed=True needs an initialized torch.distributed process group")
        #: rank 0 of a collective Checkpointer (or the only process) owns the run directory
        self.coordinator = not self.collective or dist.get_rank() == 0

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
        (asynchronous, as :func:`ckptstore.save`). ``metrics`` (JSON numbers) are
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

        self._agree(prepare, f"preparing the save of step {step}")
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
        """Every step committed on any tier, ascending (not verified)."""
        return sorted({s for t in self._tiers() for s in t.committed()})

    def latest(self) -> int | None:
        """The newest step that is committed and passes verification (manifest
        checksum and structure, every file present at its size) on some tier, or
        None. Chunk hashes are checked by ``load``, which falls back further.
        Collective: rank 0 decides, every rank gets its answer."""
        self._settle()
        return self._agree(self._latest_here, "finding the latest step")

    def _latest_here(self) -> int | None:
        for step, tier in candidates(self._tiers(), "latest"):
            problem = check_quick(tier.root.child(step_name(step)))
            if problem is None:
                return step
            _warn(f"{tier.name} copy of step {step} ({tier.root.url}/{step_name(step)}) "
                  f"is unusable: {problem}")
        return None

    def load(self, step: "int | str" = "latest", *, into: Any = None, strict: bool = True,
             verify: bool = True, cast: bool = False) -> Any:
        """Load ``step`` (or the newest intact one) like :func:`ckptstore.load`.

        Copies are tried local first; a copy that fails verification is reported
        with a :class:`CheckpointFallbackWarning` and the next one is tried: the
        other tier's copy of the same step, then (for ``"latest"``) older steps.
        ``self.loaded_step`` tells which step was loaded. Tensors are copied into
        memory of their own, never maps of the run's files (retention and ``gc`` may
        remove or rewrite those).

        Collective: rank 0 lists the copies to try; each rank reads what it needs
        (its own boxes when ``into`` holds DTensors), and a copy is used only if it
        loaded on every rank, so all ranks return the same step.
        """
        from ckptstore.api.load import load

        load = repairing(load, self.local, None if self.collective else self.remote)  # docs/tiers.md
        self._settle()
        cands = self._agree(lambda: [(s, t.name) for s, t in candidates(self._tiers(), step)],
                            f"choosing step {step!r} to load")
        tiers = {t.name: t for t in self._tiers()}
        problems = []
        for s, tname in cands:
            tier = tiers[tname]
            where = tier.root.child(step_name(s))
            out: Any = None
            outcome: tuple[str, ...] | None = None
            err: Exception | None = None
            try:
                out = load(where, into=into, strict=strict, verify=verify, cast=cast, mmap=False)
            except SchemaVersionError as e:
                if not self.collective:
                    raise
                outcome, err = ("fatal", type(e).__name__, str(e)), e
            except (CorruptCheckpointError, CheckpointNotFoundError, StorageError,
                    FileNotFoundError, ConnectionError, TimeoutError) as e:
                outcome = ("fallback", f"{type(e).__name__}: {e}")
            except Exception as e:
                if not self.collective:
                    raise
                outcome, err = ("fatal", type(e).__name__, str(e)), e
            outcomes = self._exchange(outcome)
            fatal = [(r, o) for r, o in enumerate(outcomes) if o and o[0] == "fatal"]
            if fatal:  # every rank raises: its own error, or the first rank's
                if err is not None:
                    raise err
                r, (_, name, msg) = fatal[0]
                raise _rebuild_error(name, f"rank {r} failed to load step {s}: {msg}", r,
                                     "load")
            bad = [(r, o[1]) for r, o in enumerate(outcomes) if o]
            if bad:
                why = "; ".join(msg if len(outcomes) == 1 else f"rank {r}: {msg}"
                                for r, msg in bad)
                problems.append(f"{tier.name} step {s}: {why}")
                if self.coordinator:
                    _warn(f"{tier.name} copy of step {s} ({where.url}) is unusable: "
                          f"{why}; falling back")
                continue
            self.loaded_step = s
            return out
        what = "any step" if step == "latest" else f"step {step}"
        raise CheckpointNotFoundError(
            f"no intact committed checkpoint of {what} on "
            f"{' or '.join(t.root.url for t in self._tiers())}"
            + (": " + "; ".join(problems) if problems else ""))

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

        self._agree(settle, "finishing background work")

    def _wait_local(self) -> None:
        """Wait for this process's own save and background work (no collective)."""
        last = self._last
        if last is not None:
            last.exception()
        self._queue.join()

    def close(self) -> None:
        """``wait()``, then stop the background thread and promotion process."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._stop()

    def _stop(self) -> None:
        self._closed = True
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join()
            self._worker = None
        if self._promoter is not None:
            self._promoter.shutdown(wait=True)
            self._promoter = None

    # -- background -----------------------------------------------------------
    def _raise_background(self) -> None:
        with self._lock:
            err, self._error = self._error, None
        if err is not None:
            raise err

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
        if self.local is not None and self.remote is not None:
            self._promote_wanted()  # raises on failure: then nothing is deleted this round
            self._retain(self.local, protected=unpromoted(self.local, self.remote))
            self._retain(self.remote)
        else:
            self._retain(self.primary)

    def _promote_wanted(self) -> None:
        from ckptstore.runs.promote import promote_step

        for s in sorted(unpromoted(self.local, self.remote), reverse=True):  # type: ignore[arg-type]
            fut = self._promotion_pool().submit(promote_step, self.local.root,  # type: ignore
                                                self.remote.root, step_name(s))  # type: ignore
            res = fut.result()
            log.info("step %d promoted to %s (%d bytes uploaded)", s, res.dst, res.uploaded_bytes)

    def _promotion_pool(self) -> cf.Executor:
        if self._promoter is None:
            if self.remote.root.capabilities.process_local:  # type: ignore[union-attr]
                # per-process filesystem (memory://): upload from this process
                self._promoter = cf.ThreadPoolExecutor(1, thread_name_prefix="ckptstore-promote")
            else:
                from ckptstore.pipeline.writer import spawn_pool

                self._promoter = spawn_pool(1)
        return self._promoter

    def _retain(self, tier: Tier, protected: frozenset[int] | set[int] = frozenset()) -> None:
        retain(tier, protected)  # a method: tests count the rounds per rank

    # -- agreement between ranks ---------------------------------------------
    def _settle(self) -> None:
        """Wait until this rank's previous save has committed: its commit thread uses
        the same gloo group as ``_agree``, and two threads must never interleave
        collectives on one group."""
        last = self._last
        if last is not None:
            last.exception()

    def _agree(self, fn: Callable[[], Any], what: str) -> Any:
        """Run ``fn`` on the coordinator only and give every rank its result.

        If ``fn`` raises, rank 0 raises that error itself and the other ranks raise
        one of the same type (or :class:`DistributedSaveError`) naming rank 0."""
        if not self.collective:
            return fn()
        from ckptstore.commit import twophase as pc

        group = pc.coordination_group()
        if self.coordinator:
            try:
                value = fn()
            except Exception as e:
                pc.broadcast(("error", type(e).__name__, str(e)), group)
                raise
            return pc.broadcast(("ok", value), group)[1]
        got = pc.broadcast(None, group)
        if got[0] == "ok":
            return got[1]
        raise _rebuild_error(got[1], f"rank 0 failed {what}: {got[2]}", 0, "checkpointer")

    def _exchange(self, value: Any) -> list:
        """Every rank's ``value``, in rank order (just ``[value]`` alone)."""
        if not self.collective:
            return [value]
        from ckptstore.commit import twophase as pc

        out: list = [None] * dist.get_world_size()
        dist.all_gather_object(out, value, group=pc.coordination_group())
        return out

    # -- helpers --------------------------------------------------------------
    def _tiers(self) -> list[Tier]:
        return [t for t in (self.local, self.remote) if t is not None]

def _world_size() -> int:
    """Ranks in the initialized default process group, 0 if there is none."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_world_size()


def _rebuild_error(name: str, message: str, rank: int, phase: str) -> Exception:
    """Another rank's error, raised here with the same type where it is one of ours
    or a builtin (constructible from a message); else a DistributedSaveError."""
    import builtins

    cls = getattr(_errors, name, None) or getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception) and (
            issubclass(cls, _errors.CkptError) or cls.__module__ == "builtins"):
        try:
            return cls(message)
        except TypeError:  # a constructor that wants more than a message
            pass
    return DistributedSaveError(message, ((rank, phase, name, message),))


def _warn(message: str) -> None:
    log.warning("%s", message)
    warnings.warn(message, CheckpointFallbackWarning, stacklevel=3)
