"""The trainer's only contact with the checkpoint engine.

Builds the state tree (model, optimizer, scheduler, scaler, per-rank RNG, data position, step,
config) and restores it. The training loop calls only ``save``, ``wait`` and
``maybe_resume``. Everything that changes training dynamics is in the tree; nothing is pickled
into it (RNG states are tensors, arrays and tuples of ints).

With several ranks (FSDP2) every rank owns a collective ``ckptstore.Checkpointer`` and saves
the model and optimizer as the sharded state dicts of ``torch.distributed.checkpoint.state_dict``
(DTensor local shards, no gather): each rank writes its own shards, rank 0 commits, and a
resume loads each rank's boxes straight into its sharded state dict (any saved world size).
Plain values are identical on every rank (taken from rank 0, RNG states gathered from all), so
they are written once. A single process saves full state dicts, as before.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from .config import TrainConfig
from .data import TokenStream

log = logging.getLogger(__name__)

# Fields that may differ between a checkpoint's config and the resuming run without a warning.
_BENIGN_CONFIG_KEYS = {"resume", "out_dir", "config", "remote", "remote_keep_last", "step_delay",
                       "ckpt_every_steps", "ckpt_every_seconds", "keep_last", "keep_every",
                       "keep_best", "log_every", "compression", "find_batch_size"}


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
                                  compression=cfg.compression)


# ---- RNG ---------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """This process's RNG states (Python, numpy, torch CPU, every CUDA device) as plain data."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (str(np_state[0]), np.asarray(np_state[1]), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])),
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of ``rng_state``; accepts lists where tuples were saved."""
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((str(name), np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss),
                         float(cached)))
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.as_tensor(s, dtype=torch.uint8) for s in state["cuda"]])


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
        self._sd_options = (StateDictOptions() if self.sharded  # DTensor shards, no copy
                            else StateDictOptions(full_state_dict=True, cpu_offload=True))

    # ---- saving -------------------------------------------------------------------------
    def volatile(self) -> dict[str, Any]:
        """RNG + data position *now*; captured at the start of a step for a deferred save."""
        return {"rng": rng_state(), "data": self.parts.data.state_dict()}

    def build_state(self, step: int, volatile: dict[str, Any] | None = None) -> dict[str, Any]:
        """The state tree (model and optimizer as DTensor shards when sharded). Collective
        under FSDP2: every rank gets the same tree apart from its own shards."""
        p = self.parts
        volatile = volatile or self.volatile()
        model_sd, optim_sd = get_state_dict(p.model, p.optimizer, options=self._sd_options)
        small = {"sched": p.scheduler.state_dict(), "scaler": p.scaler.state_dict(),
                 "data": volatile["data"], "config": p.cfg.to_dict(),
                 "meta": {"world_size": self.world_size, "saved_at": time.time()}}
        rngs: list[Any] = [volatile["rng"]]
        if self.sharded:
            # a distributed save writes plain values once, so they must be equal on every rank:
            # rank 0's small state, and the RNG states of all ranks (one entry per rank)
            rngs = [None] * self.world_size
            dist.all_gather_object(rngs, volatile["rng"])
            box = [small]
            dist.broadcast_object_list(box, src=0)
            small = box[0]
        return {"step": step, "model": model_sd, "optim": optim_sd, "sched": small["sched"],
                "scaler": small["scaler"], "rng": rngs, "data": small["data"],
                "config": small["config"], "meta": small["meta"]}

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
        if resume != "auto":
            return self.backend.load(int(resume), **kwargs)
        if self.backend.latest() is None:
            if self.rank == 0:
                log.info("no checkpoint to resume from in %s; starting fresh", self.parts.cfg.ckpt_dir)
            return None
        # "latest" lets the engine fall back to an older step if the newest fails verification
        return self.backend.load("latest", **kwargs)

    def maybe_resume(self) -> int:
        """Restore from the checkpoint ``--resume`` names; return the step to continue after (0 = fresh)."""
        if self.sharded:
            return self._restore_sharded()
        state = self._load_for_resume()
        if state is None:
            return 0
        p = self.parts
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(p.model, state["model"], options=options)
        set_optimizer_state_dict(p.model, p.optimizer, _as_optim_state(state["optim"]), options=options)
        return self._restore_small(state, list(state["rng"]))

    def _restore_sharded(self) -> int:
        """Every rank loads its own boxes into its sharded state dicts, then ``set_state_dict``."""
        p = self.parts
        model_sd, optim_sd = get_state_dict(p.model, p.optimizer, options=self._sd_options)
        # the tree build_state saves, with lists for tuples: loading replaces plain values in place
        target = {"step": 0, "model": model_sd, "optim": _mutable(optim_sd),
                  "sched": _mutable(p.scheduler.state_dict()), "scaler": _mutable(p.scaler.state_dict()),
                  "rng": [_mutable(rng_state()) for _ in range(self.world_size)],
                  "data": _mutable(p.data.state_dict()), "config": _mutable(p.cfg.to_dict()),
                  "meta": {"world_size": 0, "saved_at": 0.0}}
        report = self._load_for_resume(into=target)
        if report is None:
            return 0
        # rng entries may differ in number (another world size) and config may have grown new
        # fields; everything else must have been in the checkpoint, with the same shape
        required = {"step", "model", "optim", "sched", "scaler", "data", "meta"}
        bad = [n for n in report.missing if n.split(".", 1)[0] in required]
        bad += [f"{n} ({why})" for n, why in report.mismatched if n.split(".", 1)[0] in required]
        if bad:
            raise ValueError(f"checkpoint does not fit this run: {', '.join(bad[:10])}"
                             + (f" and {len(bad) - 10} more" if len(bad) > 10 else ""))
        set_model_state_dict(p.model, target["model"], options=self._sd_options)
        set_optimizer_state_dict(p.model, p.optimizer, _as_optim_state(target["optim"]),
                                 options=self._sd_options)
        saved_world = int(target["meta"]["world_size"])
        return self._restore_small(target, target["rng"][:min(saved_world, self.world_size)])

    def _restore_small(self, small: dict[str, Any], rngs: list[Any]) -> int:
        """Scheduler, scaler, data position, this rank's RNG; returns the saved step."""
        p = self.parts
        saved_world = int(small["meta"]["world_size"])
        if saved_world != self.world_size:
            log.warning("checkpoint was written by %d ranks, resuming on %d: per-rank RNG is reused "
                        "round-robin, so the run is not bit-exact", saved_world, self.world_size)
        _warn_config_drift(dict(small["config"]), p.cfg.to_dict())
        p.scheduler.load_state_dict(dict(small["sched"]))
        if small["scaler"]:
            p.scaler.load_state_dict(dict(small["scaler"]))
        p.data.load_state_dict(dict(small["data"]))
        set_rng_state(rngs[self.rank % len(rngs)])
        step = int(small["step"])
        log.info("resumed from checkpoint %d (data position %s)", step, small["data"])
        return step


def _mutable(tree: Any) -> Any:
    """``tree`` with its containers copied as dicts and lists (tuples cannot take values loaded in
    place); tensors and arrays are the same objects, so a load fills them."""
    if isinstance(tree, dict):
        return {k: _mutable(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)) and not isinstance(tree, torch.Size):
        return [_mutable(v) for v in tree]
    return tree


def _as_optim_state(optim: dict[str, Any]) -> dict[str, Any]:
    """Undo container changes a storage round trip may make (tuples come back as lists)."""
    groups = []
    for group in optim["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": optim["state"], "param_groups": groups}


def _warn_config_drift(saved: dict[str, Any], now: dict[str, Any]) -> None:
    changed = sorted(k for k in saved.keys() & now.keys()
                     if k not in _BENIGN_CONFIG_KEYS and saved[k] != now[k])
    if changed:
        log.warning("resuming with changed settings %s: training dynamics differ from the saved run",
                    {k: (saved[k], now[k]) for k in changed})
