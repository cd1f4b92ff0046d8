"""The trainer's only contact with the checkpoint engine.

Builds the state tree (model, optimizer, scheduler, scaler, per-rank RNG, data position, step,
config) and restores it. The training loop calls only ``save``, ``wait_staged``, ``wait`` and
``maybe_resume``. Everything that changes training dynamics is in the tree; nothing is pickled
into it (RNG states are tensors, arrays and tuples of ints).

Under FSDP2 the model and optimizer go through ``torch.distributed.checkpoint.state_dict`` as
full (unsharded) state dicts gathered to CPU on rank 0, and only rank 0 owns a
``ckptstore.Checkpointer``. A later change makes saves sharded.
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
    def load(self, step: int | str = "latest") -> Any: ...
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

    # keep_best also narrows the remote tier's retention, so only ask for it when there is a val loss
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

    ``backend_factory`` builds the engine on rank 0 (default: ``make_backend``); tests pass a fake.
    """

    def __init__(self, parts: Parts, backend_factory: Callable[[TrainConfig], Backend] | None = None
                 ) -> None:
        self.parts = parts
        self.rank = dist.get_rank() if _distributed() else 0
        self.world_size = dist.get_world_size() if _distributed() else 1
        self.backend: Backend | None = None
        if self.rank == 0:
            self.backend = (backend_factory or make_backend)(parts.cfg)
        self._handle: Any = None
        self._sd_options = StateDictOptions(full_state_dict=True, cpu_offload=True)

    # ---- saving -------------------------------------------------------------------------
    def volatile(self) -> dict[str, Any]:
        """RNG + data position *now*; captured at the start of a step for a deferred save."""
        return {"rng": rng_state(), "data": self.parts.data.state_dict()}

    def build_state(self, step: int, volatile: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The full state tree on rank 0 (None elsewhere). Collective under FSDP2."""
        p = self.parts
        volatile = volatile or self.volatile()
        model_sd, optim_sd = get_state_dict(p.model, p.optimizer, options=self._sd_options)
        rngs: list[Any] = [volatile["rng"]]
        if self.world_size > 1:
            rngs = [None] * self.world_size if self.rank == 0 else None  # type: ignore[assignment]
            dist.gather_object(volatile["rng"], rngs, dst=0)
        if self.rank != 0:
            return None
        return {
            "step": step,
            "model": model_sd,
            "optim": optim_sd,
            "sched": p.scheduler.state_dict(),
            "scaler": p.scaler.state_dict(),
            "rng": rngs,
            "data": volatile["data"],
            "config": p.cfg.to_dict(),
            "meta": {"world_size": self.world_size, "saved_at": time.time()},
        }

    def save(self, step: int, metrics: dict[str, float] | None = None,
             volatile: dict[str, Any] | None = None) -> None:
        """Snapshot the state as checkpoint ``step`` (async on rank 0; collective)."""
        state = self.build_state(step, volatile)
        if self.backend is not None:
            self._handle = self.backend.save(step, state, metrics=metrics)
            log.info("checkpoint %d: snapshot taken%s", step, f" (metrics {metrics})" if metrics else "")

    def wait_staged(self) -> None:
        """Block until the pending snapshot no longer reads live tensors (before optimizer.step)."""
        wait_staged = getattr(self._handle, "wait_staged", None)
        if wait_staged is not None:
            wait_staged()

    def wait(self) -> None:
        """Block until every save so far is durable (and re-raise a background failure)."""
        if self.backend is not None:
            self.backend.wait()
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        """Wait for pending saves and release the engine."""
        if self.backend is not None:
            self.backend.wait()
            self.backend.close()
            self.backend = None

    # ---- restoring ----------------------------------------------------------------------
    def _load_for_resume(self) -> dict[str, Any] | None:
        """Rank 0: the tree ``--resume`` names, or None to start fresh."""
        resume = self.parts.cfg.resume
        if resume == "never" or self.backend is None:
            return None
        if resume != "auto":
            return self.backend.load(int(resume))
        if self.backend.latest() is None:
            log.info("no checkpoint to resume from in %s; starting fresh", self.parts.cfg.ckpt_dir)
            return None
        # "latest" lets the engine fall back to an older step if the newest fails verification
        return self.backend.load("latest")

    def maybe_resume(self) -> int:
        """Restore from the checkpoint ``--resume`` names; return the step to continue after (0 = fresh)."""
        state = self._load_for_resume() if self.rank == 0 else None
        found = [state is not None]
        if self.world_size > 1:
            dist.broadcast_object_list(found, src=0)
        if not found[0]:
            return 0
        return self._restore(state)

    def _restore(self, state: dict[str, Any] | None) -> int:
        p = self.parts
        broadcast = self.world_size > 1
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=broadcast)
        # Model and optimizer separately: with broadcast_from_rank0 the other ranks pass empty
        # dicts, and set_state_dict would then take a different (optim-only) path on them.
        set_model_state_dict(p.model, state["model"] if state else {}, options=options)
        set_optimizer_state_dict(p.model, p.optimizer, _as_optim_state(state["optim"]) if state else {},
                                 options=options)
        small = None if state is None else {k: state[k] for k in ("step", "sched", "scaler", "data", "config", "meta")}
        rngs = None if state is None else list(state["rng"])
        if broadcast:
            box = [small]
            dist.broadcast_object_list(box, src=0)
            small = box[0]
            mine: list[Any] = [None]
            dist.scatter_object_list(mine, [rngs[r % len(rngs)] for r in range(self.world_size)]
                                     if self.rank == 0 else None, src=0)
            rng = mine[0]
        else:
            rng = rngs[0]
        assert small is not None
        saved_world = int(small["meta"]["world_size"])
        if saved_world != self.world_size:
            log.warning("checkpoint was written by %d ranks, resuming on %d: per-rank RNG is reused "
                        "round-robin, so the run is not bit-exact", saved_world, self.world_size)
        _warn_config_drift(dict(small["config"]), p.cfg.to_dict())
        p.scheduler.load_state_dict(dict(small["sched"]))
        if small["scaler"]:
            p.scaler.load_state_dict(dict(small["scaler"]))
        p.data.load_state_dict(dict(small["data"]))
        set_rng_state(rng)
        step = int(small["step"])
        log.info("resumed from checkpoint %d (data position %s)", step, small["data"])
        return step


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
