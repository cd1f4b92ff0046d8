"""Reuse the previous save's layout when the state has the same leaves."""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ckptstore.plan.layout import SavePlan, make_plan
from ckptstore.plan.tree import Leaf


class PlanCache:
    """``make_plan``, reusing the previous save's layout when the tree has the same
    leaves (paths, kinds, dtypes, shapes): the steady state of a training run, where
    planning hundreds of tensors would otherwise add to every stall. Only the save id
    (in file names and safetensors headers) differs between saves. Holds one entry;
    owned by the engine, so it lives and dies with it."""

    def __init__(self) -> None:
        self._entry: tuple[tuple, SavePlan, str] | None = None

    def plan(self, leaves: list[Leaf], *, save_id: str, **params: Any) -> SavePlan:
        sig = (tuple((leaf.path, _leaf_sig(leaf.value)) for leaf in leaves),
               tuple(sorted(params.items())))
        if self._entry is None or self._entry[0] != sig:
            plan = make_plan(leaves, save_id=save_id, **params)
            self._entry = (sig, plan, save_id)
            return plan
        _, plan, old = self._entry
        tag_old, tag_new = f'"save_id":"{old}"'.encode(), f'"save_id":"{save_id}"'.encode()
        files = tuple(dataclasses.replace(f, name=f.name.replace(old, save_id),
                                          header=f.header.replace(tag_old, tag_new))
                      for f in plan.files)
        return dataclasses.replace(plan, files=files)


def _leaf_sig(value: Any) -> tuple:
    if isinstance(value, torch.Tensor):
        return ("t", value.dtype, tuple(value.shape))
    return ("n", value.dtype.str, value.shape)
