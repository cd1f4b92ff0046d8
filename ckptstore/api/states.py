"""Stateful wrappers over ``torch.distributed.checkpoint.state_dict`` for sharded models.

A plain ``nn.Module`` or optimizer can go straight into a state. Under FSDP2 (or
DDP, or tensor parallelism) use these two, as DCP's guides do with ``get_state_dict``:

    state = {"model": ckptstore.ModelState(model),
             "optim": ckptstore.OptimizerState(model, optimizer), ...}
    ckptstore.save(state, path)                 # every rank: each writes its shards
    ckptstore.load(path, into=state)            # any number of ranks

Keys are parameter names (not positions), a fresh optimizer gets its state created
before it is loaded, and sharded models keep their shards: nothing is gathered.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ckptstore.distributed.shards import holds_dtensor


def _options(model: torch.nn.Module, full: bool | None, strict: bool = True) -> StateDictOptions:
    full = not holds_dtensor(model) if full is None else full
    return StateDictOptions(full_state_dict=full, cpu_offload=full, strict=strict)


class ModelState:
    """``model``'s state dict by parameter name: DTensor shards when the model is sharded
    (``full=None``, the default) or whole CPU tensors (``full=True``)."""

    def __init__(self, model: torch.nn.Module, *, full: bool | None = None, strict: bool = True) -> None:
        self.model, self.full, self.strict = model, full, strict

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model, options=_options(self.model, self.full))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # whole tensors (a plain load) are scattered to the shards; shards are taken as they are
        full = not holds_dtensor(state) if self.full is None else self.full
        set_model_state_dict(self.model, state, options=_options(self.model, full, self.strict))


class OptimizerState:
    """``optimizer``'s state keyed by parameter names of ``model``; a fresh optimizer has its
    state created first, so ``load(into=...)`` fills it."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
                 full: bool | None = None) -> None:
        self.model, self.optimizer, self.full = model, optimizer, full

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer, options=_options(self.model, self.full))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        full = not holds_dtensor(state) if self.full is None else self.full
        groups = []
        for group in state["param_groups"]:  # a JSON round trip may give lists for tuples
            group = dict(group)
            if isinstance(group.get("betas"), list):
                group["betas"] = tuple(group["betas"])
            groups.append(group)
        set_optimizer_state_dict(self.model, self.optimizer, {"state": state["state"], "param_groups": groups},
                                 options=_options(self.model, full))
