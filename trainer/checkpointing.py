"""The trainer's only contact with the checkpoint engine.

Builds the state tree (model, optimizer, scheduler, scaler, per-rank RNG, data position, step,
config) and restores it. The training loop calls only ``save``, ``wait`` and
``maybe_resume``. Everything that changes training dynamics is in the tree; nothing is pickled
into it. The live objects go in as ckptstore's Stateful objects (``ModelState``,
``OptimizerState``, ``RNGState``, the scheduler and the data stream), and a resume hands each
its part through ``load_state_dict``.

With several ranks (FSDP2) every rank owns a collective ``ckptstore.Checkpointer`` and saves
the model and optimizer as their sharded state dicts (DTensor local shards, no gather): each
rank writes its own shards, rank 0 commits, and a resume loads each rank's boxes straight
into its sharded state dicts (any saved world size).
Plain values are identical on every rank (taken from rank 0, RNG states gathered from all), so
they are written once. A single process saves full state dicts, as before.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist

import ckptstore

from .config import TrainConfig
from .data import TokenStream

log = logging.getLogger(__name__)

# Fields that may differ between a checkpoint's config and the resuming run without a warning.
_BENIGN_CONFIG_KEYS = {"resume", "out_dir", "config", "remote", "remote_keep_last", "step_delay",
                       "ckpt_every_steps", "ckpt_every_seconds", "keep_last", "keep_every",
                       "keep_best", "log_every", "compression", "find_batch_size",
                       "memory"}


class Backend(Protocol):
    """What the trainer needs from ``ckptstore.Checkpointer`` (also implemented by test fakes)."""

    def save(self, step: int, state: Any, metrics: dict[str, float] | None = None) -> Any: ...
    def latest(self) -> int | None: ...
    def load(self, step: int | str = "latest", *, into: Any = None, strict: bool = True) -> Any: ...
    # with several ranks, every rank owns a backend and all calls are collective
    def wait(self) -> None: ...
    def close(self) -> None: ...


@dataclass
class Parts:
    """The live objects a checkpoint captures."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    data: TokenStream
    cfg: TrainConfig


def make_backend(cfg: TrainConfig) -> Backend:
    """The real engine: ``ckptstore.Checkpointer`` on the run's local dir (+ optional remote)."""
    import ckptstore  # imported late: the trainer's other parts do not need the engine

    # keep_best ranks steps by val_loss: ask for it only when the run measures one (on a remote
    # tier with retention of its own it also protects the best steps; it never narrows one)
    keep_best = ("val_loss", "min", cfg.keep_best) if cfg.keep_best and cfg.val_every else None
    return ckptstore.Checkpointer(cfg.ckpt_dir, cfg.remote, keep_last=cfg.keep_last,
                                  keep_every=cfg.keep_every, keep_best=keep_best,
                                  remote_keep_last=cfg.remote_keep_last,
                                  compression=cfg.compression, memory=cfg.memory)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class TrainCheckpointer:
    """Save/restore policy-free plumbing between the loop and the engine.

    ``backend_factory`` builds the engine (default: ``make_backend``); tests pass a fake. Under
    FSDP2 every rank owns one and calls it collectively.
    """

    def __init__(self, parts: Parts, backend_factory: Callable[[TrainConfig], Backend] | None = None
                 ) -> None:
        self.parts = parts
        self.rank = dist.get_rank() if _distributed() else 0
        self.world_size = dist.get_world_size() if _distributed() else 1
        self.sharded = self.world_size > 1  # every rank saves its own shards, collectively
        self.backend: Backend | None = (backend_factory or make_backend)(parts.cfg)
        self._handle: Any = None
        self.full = not self.sharded  # sharded: DTensor shards, no copy; else whole CPU tensors

    # ---- saving -------------------------------------------------------------------------
    def volatile(self) -> dict[str, Any]:
        """RNG + data position *now*; captured at the start of a step for a deferred save."""
        return {"rng": ckptstore.RNGState(per_rank=True, snapshot=True), "data": self.parts.data.state_dict()}

    def build_state(self, step: int, volatile: dict[str, Any] | None = None) -> dict[str, Any]:
        """The state tree, with the model and optimizer as Stateful objects (their DTensor shards
        when sharded). Saving it is collective under FSDP2: the RNG states of every rank are
        gathered, and plain values are rank 0's (a distributed save writes them once)."""
        p = self.parts
        volatile = volatile or self.volatile()
        small = {"sched": p.scheduler.state_dict(), "scaler": p.scaler.state_dict(),
                 "data": volatile["data"], "config": p.cfg.to_dict(),
                 "meta": {"world_size": self.world_size, "saved_at": time.time()}}
        if self.sharded:
            box = [small]
            dist.broadcast_object_list(box, src=0)
            small = box[0]
        return {"step": step, "model": ckptstore.ModelState(p.model, full=self.full),
                "optim": ckptstore.OptimizerState(p.model, p.optimizer, full=self.full),
                "sched": small["sched"], "scaler": small["scaler"], "rng": volatile["rng"],
                "data": small["data"], "config": small["config"], "meta": small["meta"]}

    def save(self, step: int, metrics: dict[str, float] | None = None,
             volatile: dict[str, Any] | None = None) -> None:
        """Snapshot the state as checkpoint ``step`` (async on rank 0; collective)."""
        state = self.build_state(step, volatile)
        if self.backend is not None:
            self._handle = self.backend.save(step, state, metrics=metrics)
            log.info("checkpoint %d: snapshot taken%s", step, f" (metrics {metrics})" if metrics else "")

    def wait(self) -> None:
        """Block until every save so far is durable (and re-raise a background failure)."""
        if self.backend is not None:
            self.backend.wait()
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        """Wait for pending saves and release the engine (collective when sharded)."""
        if self.backend is not None:
            self.backend.wait()
            self.backend.close()
            self.backend = None

    def abort(self, exc: BaseException) -> None:
        """Release the engine after ``exc`` ended the run on this rank. No collective: the other
        ranks may never get here (a Checkpointer's ``__exit__`` then only waits locally)."""
        backend, self.backend = self.backend, None
        if backend is None:
            return
        exit_ = getattr(backend, "__exit__", None)
        if exit_ is not None:
            exit_(type(exc), exc, exc.__traceback__)
        else:
            backend.close()

    # ---- restoring ----------------------------------------------------------------------
    def _load_for_resume(self, into: Any = None) -> Any:
        """What ``--resume`` names: the tree, or with ``into`` the engine's load report; None to
        start fresh. Rank 0 alone, or every rank together when sharded."""
        resume = self.parts.cfg.resume
        if resume == "never" or self.backend is None:
            return None
        kwargs = {} if into is None else {"into": into, "strict": False}  # checked by the caller
        if resume == "auto" and self.backend.latest() is None:
            if self.rank == 0:
                log.info("no checkpoint to resume from in %s; starting fresh", self.parts.cfg.ckpt_dir)
            return None
        if into is not None and "optim" in into and not self.parts.optimizer.state:
            # a fresh optimizer's state is created by a dummy step (torch's get_optimizer_state_dict:
            # most of a small resume on FSDP2); done first, so that the restore is timed alone
            t0 = time.perf_counter()
            into["optim"].state_dict()
            log.info("optimizer state created in %.3f s", time.perf_counter() - t0)
        # "latest" lets the engine fall back to an older step if the newest fails verification
        return self.backend.load("latest" if resume == "auto" else int(resume), **kwargs)

    def maybe_resume(self) -> int:
        """Restore from the checkpoint ``--resume`` names; return the step to continue after (0 = fresh).

        Every live object takes its part through ``load_state_dict`` (the model's and optimizer's
        shards straight from the chunks that hold them, at any saved world size); plain values are
        kept and checked here."""
        p = self.parts
        kept = {k: _Kept() for k in ("step", "scaler", "config", "meta")}
        target = {"model": ckptstore.ModelState(p.model, full=self.full),
                  "optim": ckptstore.OptimizerState(p.model, p.optimizer, full=self.full),
                  "sched": p.scheduler, "data": p.data, "rng": ckptstore.RNGState(per_rank=True), **kept}
        report = self._load_for_resume(into=target)
        if report is None:
            return 0
        required = {"step", "model", "optim", "sched", "scaler", "data", "meta", "rng"}
        bad = [n for n in report.missing if n.split(".", 1)[0] in required]
        bad += [f"{n} ({why})" for n, why in report.mismatched if n.split(".", 1)[0] in required]
        if bad:
            raise ValueError(f"checkpoint does not fit this run: {', '.join(bad[:10])}"
                             + (f" and {len(bad) - 10} more" if len(bad) > 10 else ""))
        saved_world = int(kept["meta"].value["world_size"])
        if saved_world != self.world_size:
            log.warning("checkpoint was written by %d ranks, resuming on %d: per-rank RNG is reused "
                        "round-robin, so the run is not bit-exact", saved_world, self.world_size)
        if kept["config"].value is not None:
            _warn_config_drift(dict(kept["config"].value), p.cfg.to_dict())
        if kept["scaler"].value:
            p.scaler.load_state_dict(dict(kept["scaler"].value))
        step = int(kept["step"].value)
        log.info("resumed from checkpoint %d (data position %s)", step, p.data.state_dict())
        source = getattr(self.backend, "loaded_from", None)
        if source is not None and self.rank == 0:  # where the state came from, and what it cost
            timings = getattr(self.backend, "load_timings", [])
            log.info("resume source: %s in %.3f s (%s)", source, sum(t[1] for t in timings),
                     ", ".join(f"{t}: {s * 1e3:.1f} ms {o}" for t, s, o in timings))
        return step


class _Kept:
    """A Stateful that keeps the value it is given (plain values the caller checks itself)."""

    def __init__(self) -> None:
        self.value: Any = None

    def state_dict(self) -> Any:
        return self.value

    def load_state_dict(self, value: Any) -> None:
        self.value = value


def _warn_config_drift(saved: dict[str, Any], now: dict[str, Any]) -> None:
    changed = sorted(k for k in saved.keys() & now.keys()
                     if k not in _BENIGN_CONFIG_KEYS and saved[k] != now[k])
    if changed:
        log.warning("resuming with changed settings %s: training dynamics differ from the saved run",
                    {k: (saved[k], now[k]) for k in changed})
