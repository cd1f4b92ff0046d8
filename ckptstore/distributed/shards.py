"""Which bytes of the state each rank writes: DTensor local shards with their global
offsets, and one owner for every replicated value.

A DTensor's local shard is described by DCP's own ``__create_chunk_list__`` (offsets
and sizes in global coordinates), so every placement DCP can save is placed the same
way here. A replica (a ``Replicate`` mesh dimension, or a plain tensor that every rank
holds) is written by exactly one rank: for DTensors the rank at coordinate 0 of every
replicated mesh dimension, for plain tensors the rank a deterministic greedy balance
assigns (every rank computes the same assignment from the same list of sizes).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ckptstore.errors import UnsupportedTypeError
from ckptstore.plan.stateful import is_stateful
from ckptstore.plan.tree import Leaf, flatten, path_name


def is_dtensor(x: Any) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (without importing it eagerly)."""
    if not isinstance(x, torch.Tensor) or not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(x, DTensor)


def holds_dtensor(tree: Any, depth: int = 0) -> bool:
    """True if any leaf of a nested dict/list/tuple (or a module's or other Stateful
    object's state) is a DTensor."""
    if isinstance(tree, torch.nn.Module):
        return any(is_dtensor(p) for p in tree.parameters()) or any(
            is_dtensor(b) for b in tree.buffers())
    if depth > 128:
        return False
    if isinstance(tree, torch.optim.Optimizer):  # its parameters say it, without a state_dict()
        return any(is_dtensor(p) for g in tree.param_groups for p in g["params"])
    if is_stateful(tree):
        return holds_dtensor(tree.state_dict(), depth + 1)
    if isinstance(tree, dict):
        return any(holds_dtensor(v, depth + 1) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return any(holds_dtensor(v, depth + 1) for v in tree)
    return is_dtensor(tree)


@dataclass(frozen=True, slots=True)
class GlobalLeaf:
    """One array of the state as the whole job sees it (identical on every rank)."""

    id: int
    name: str
    kind: str  # "torch" | "numpy"
    dtype: str
    shape: tuple[int, ...]
    itemsize: int
    sharded: bool  # a DTensor: each rank holds boxes of it


@dataclass(frozen=True, slots=True)
class LocalShard:
    """A box of a global leaf that this rank writes."""

    leaf: int
    offsets: tuple[int, ...]
    shape: tuple[int, ...]


def flatten_global(state: Any) -> tuple[Any, list[Leaf], dict[int, Any]]:
    """``tree.flatten`` that accepts DTensors: returns the skeleton, the leaves (a
    DTensor leaf holds a zero-size stand-in) and {leaf id: DTensor}."""
    tokens: dict[int, torch.Tensor] = {}
    owners: dict[int, Any] = {}

    def swap(obj: Any, depth: int) -> Any:
        if depth > 128:
            return obj  # flatten raises the proper error
        if is_dtensor(obj):
            if id(obj) not in tokens:  # the same DTensor twice stays one leaf
                tokens[id(obj)] = torch.empty(0)
                owners[id(tokens[id(obj)])] = obj
            return tokens[id(obj)]
        if isinstance(obj, dict):
            pairs = [(k, swap(v, depth + 1)) for k, v in obj.items()]
            return OrderedDict(pairs) if isinstance(obj, OrderedDict) else dict(pairs)
        if isinstance(obj, list):
            return [swap(v, depth + 1) for v in obj]
        if isinstance(obj, tuple) and not isinstance(obj, torch.Size):
            return tuple(swap(v, depth + 1) for v in obj)
        return obj

    skeleton, leaves = flatten(swap(state, 0))
    dtensors = {leaf.id: owners[id(leaf.value)] for leaf in leaves if id(leaf.value) in owners}
    return skeleton, leaves, dtensors


def describe(leaves: list[Leaf], dtensors: dict[int, Any]) -> tuple[GlobalLeaf, ...]:
    """Global names, dtypes and shapes; names are made unique as ``make_plan`` does."""
    out, used = [], set()
    for leaf in leaves:
        name = path_name(leaf.path)
        if name in used:
            name = f"{name}~{leaf.id}"
        used.add(name)
        v = dtensors.get(leaf.id, leaf.value)
        if isinstance(v, torch.Tensor):
            out.append(GlobalLeaf(leaf.id, name, "torch", str(v.dtype).removeprefix("torch."),
                                  tuple(v.shape), v.dtype.itemsize, leaf.id in dtensors))
        else:
            assert isinstance(v, np.ndarray)
            out.append(GlobalLeaf(leaf.id, name, "numpy", v.dtype.str, tuple(v.shape),
                                  v.dtype.itemsize, False))
    return tuple(out)


def _writes_replica(dt: Any) -> bool:
    """Only coordinate 0 of each replicated mesh dimension writes a DTensor's box."""
    from torch.distributed.tensor import Replicate, Shard

    coord = dt.device_mesh.get_coordinate()
    if coord is None:  # this rank is not in the mesh
        return False
    for dim, p in enumerate(dt.placements):
        if isinstance(p, Replicate):
            if coord[dim] != 0:
                return False
        elif not isinstance(p, Shard):  # Partial needs a reduction first
            raise UnsupportedTypeError(
                f"DTensor placement {p} cannot be saved; redistribute it to Shard or "
                "Replicate (full_tensor() or redistribute()) before saving")
    return True


def local_shards(glob: tuple[GlobalLeaf, ...], leaves: list[Leaf], dtensors: dict[int, Any],
                 rank: int, world: int) -> list[tuple[LocalShard, Any]]:
    """The (box, local tensor) pairs this rank writes, in leaf order."""
    plain = [g for g in glob if not g.sharded]
    owner = assign_replicated(plain, world)
    out: list[tuple[LocalShard, Any]] = []
    for g in glob:
        if g.sharded:
            dt = dtensors[g.id]
            if not _writes_replica(dt):
                continue
            chunks = dt.__create_chunk_list__()
            local = dt.to_local().detach()
            if len(chunks) != 1:
                raise UnsupportedTypeError(f"DTensor {g.name!r} has {len(chunks)} local chunks; "
                                           "only one box per rank is supported")
            c = chunks[0]
            if math.prod(c.sizes) == 0:
                continue  # uneven sharding leaves some ranks empty
            out.append((LocalShard(g.id, tuple(c.offsets), tuple(c.sizes)),
                        local.reshape(tuple(c.sizes))))
        elif owner[g.id] == rank:
            out.append((LocalShard(g.id, (0,) * len(g.shape), g.shape), leaves[g.id].value))
    return out


def assign_replicated(plain: list[GlobalLeaf], world: int) -> dict[int, int]:
    """Greedy balance of replicated leaves over ranks, largest first (deterministic)."""
    load = [0] * world
    owner: dict[int, int] = {}
    for g in sorted(plain, key=lambda g: (-math.prod(g.shape) * g.itemsize, g.id)):
        r = min(range(world), key=lambda i: (load[i], i))
        owner[g.id] = r
        load[r] += math.prod(g.shape) * g.itemsize
    return owner


def wants_distributed_save(state: Any, distributed: bool | None = None) -> bool:
    """Whether ``ckptstore.save`` must run the collective save.

    ``distributed=None`` (the default) means: when the state holds DTensors. A plain
    state is saved by the calling rank alone even inside a process group, because the
    common pattern is ``if rank == 0: save(full_state)``, which a collective would
    deadlock; pass ``distributed=True`` when every rank calls ``save`` together.
    """
    if distributed is not None:
        return bool(distributed)
    return holds_dtensor(state)
