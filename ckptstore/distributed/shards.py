"""Which bytes of the state each rank writes: DTensor local shards with their global
offsets, and one writer for every box that several ranks hold.

A DTensor's local shard is described by torch's own ``__create_chunk_list__`` (offsets
and sizes in global coordinates), so every placement FSDP2, HSDP and FSDP2 + tensor
parallelism produce (``Shard``, ``_StridedShard``, ``Replicate``) is placed as DCP
places it; ``Partial`` is refused. Each rank writes at most one contiguous box per
DTensor. A box held by several ranks (a ``Replicate`` mesh dimension, a copy of a
sliced mesh, or a plain value that every rank holds) is written by exactly one of
them, chosen by a greedy balance that every rank computes alike from the same sizes.
"""
from __future__ import annotations

import functools
import itertools
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


def _is_shard_like(p: Any) -> bool:
    """``Shard`` or ``_StridedShard`` (FSDP2 + tensor parallel), which in recent torch is
    not a ``Shard`` subclass and answers False to ``is_shard()``."""
    if p.is_shard():
        return True
    from torch.distributed.tensor import placement_types as pt

    strided = getattr(pt, "_StridedShard", None)
    return strided is not None and isinstance(p, strided)


def _placement_kinds(name: str, dt: Any) -> tuple[bool, ...]:
    """Per mesh dimension: True where it shards the tensor, False where it replicates it."""
    kinds = []
    for p in dt.placements:
        if p.is_replicate():
            kinds.append(False)
        elif _is_shard_like(p):
            kinds.append(True)
        else:  # Partial needs a reduction first
            raise UnsupportedTypeError(
                f"DTensor {name!r} has placement {p} ({type(p).__name__}), which cannot be "
                "saved; redistribute it to Shard or Replicate (redistribute() or "
                "full_tensor()) before saving")
    return tuple(kinds)


def _mesh_copies(mesh: Any, world: int) -> np.ndarray:
    """The global ranks of every copy of ``mesh``: shape ``(copies, *mesh.shape)``.

    A mesh sliced from a larger one (``mesh["dp"]`` of a dp x tp mesh, as FSDP2 + TP
    gives the parameters tensor parallelism leaves alone) exists once per coordinate
    of the dimensions sliced away; those copies hold the same values (DCP assumes the
    same when it keeps one of the equal boxes), so they are replicas of each other."""
    layout, rank_map = getattr(mesh, "_layout", None), getattr(mesh, "_rank_map", None)
    if layout is not None and rank_map is not None:  # torch >= 2.9 knows every copy
        full = layout.remap_to_tensor(rank_map).cpu().numpy().astype(np.int64)
        full = full.reshape((-1, *tuple(mesh.shape)))
    else:  # older torch: only a mesh over every rank is understood
        full = mesh.mesh.cpu().numpy().astype(np.int64)[None]
    if len(np.unique(full)) != full.size or full.min() < 0 or full.max() >= world or (
            layout is None and full.size != world):
        raise UnsupportedTypeError(
            f"a DTensor lives on a device mesh of shape {tuple(mesh.shape)} whose copies over "
            f"the {world} ranks cannot be told apart; build it with init_device_mesh() over "
            "every rank (or as a slice of such a mesh) before saving")
    return full


def _replica_rows(dt: Any, kinds: tuple[bool, ...], copies: np.ndarray) -> np.ndarray:
    """``rows[s, k]``: the global rank of the k-th holder of the s-th box of ``dt``
    (sharded mesh dimensions pick the box, replicated ones and mesh copies the holder)."""
    sharded = [d + 1 for d, k in enumerate(kinds) if k]
    replicated = [0] + [d + 1 for d, k in enumerate(kinds) if not k]
    nbox = math.prod(copies.shape[d] for d in sharded)
    return copies.transpose(sharded + replicated).reshape(nbox, -1)


@functools.lru_cache(maxsize=256)
def _tiles(shape: tuple[int, ...], mesh_shape: tuple[int, ...], placements: tuple) -> bool:
    """Whether every rank's box (first global offset and local size, as torch computes
    them) is the whole of what it holds: the distinct boxes cut every dimension into
    disjoint intervals, as only contiguous local shards can."""
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

    dims = [range(n) if _is_shard_like(p) else range(1) for n, p in zip(mesh_shape, placements)]
    boxes = set()
    for coord in itertools.product(*dims):
        size, offset = _compute_local_shape_and_global_offset(shape, mesh_shape, list(coord),
                                                               placements)
        if math.prod(size):
            boxes.add(tuple(zip(offset, size)))
    for d in range(len(shape)):
        end = 0
        for o, n in sorted({b[d] for b in boxes}):
            if o != end:
                return False
            end = o + n
    return True


def _contiguous(dt: Any, kinds: tuple[bool, ...]) -> bool:
    """Plain ``Shard`` placements nest contiguous chunks. ``_StridedShard`` as FSDP2
    places it (on the first mesh dimension that shards a tensor dimension, with a split
    factor equal to the number of shards the later mesh dimensions cut it into) is
    right-to-left chunking, contiguous too; any other use is checked box by box."""
    mesh_shape = tuple(dt.device_mesh.shape)
    placements = tuple(dt.placements)
    for i, p in enumerate(placements):
        if not kinds[i] or p.is_shard():
            continue
        earlier = [q for q in placements[:i] if _is_shard_like(q) and q.dim == p.dim]
        later = math.prod(n for n, q in zip(mesh_shape[i + 1:], placements[i + 1:])
                          if _is_shard_like(q) and q.dim == p.dim)
        if earlier or p.split_factor != later:
            return _tiles(tuple(dt.shape), mesh_shape, placements)
    return True


def check_contiguous(name: str, dt: Any) -> None:
    """Raise unless each rank's part of ``dt`` is the one contiguous box that
    ``__create_chunk_list__`` describes (readers filling DTensors need it as writers do)."""
    if not _contiguous(dt, _placement_kinds(name, dt)):
        raise UnsupportedTypeError(
            f"DTensor {name!r} with placements {dt.placements} gives ranks non-contiguous "
            "parts of it; redistribute it (e.g. to Shard) before saving or loading it")


def box_holders(glob: tuple[GlobalLeaf, ...], dtensors: dict[int, Any],
                world: int) -> dict[int, np.ndarray]:
    """``{leaf id: rows}`` where ``rows[s]`` are the global ranks holding box ``s`` of the
    leaf; a plain value is one box that every rank holds."""
    everyone = np.arange(world, dtype=np.int64)[None]
    copies: dict[int, np.ndarray] = {}
    out: dict[int, np.ndarray] = {}
    for g in glob:
        if not g.sharded:
            out[g.id] = everyone
            continue
        dt = dtensors[g.id]
        mesh = dt.device_mesh
        if id(mesh) not in copies:
            copies[id(mesh)] = _mesh_copies(mesh, world)
        out[g.id] = _replica_rows(dt, _placement_kinds(g.name, dt), copies[id(mesh)])
    return out


def assign_writers(glob: tuple[GlobalLeaf, ...], holders: dict[int, np.ndarray],
                   world: int) -> dict[int, np.ndarray]:
    """Which rank writes each box: ``{leaf id: writer of box s, for every s}``.

    Every rank computes the same answer from what they all know, without communication
    (global shapes, device meshes, placements). A box held by several ranks goes to its
    least-loaded holder so far, largest boxes first, DTensor boxes and plain values in
    one balance. A box is costed at its tensor's bytes over its number of boxes (exact
    for even sharding); ties rotate with the leaf so equal tensors spread."""
    load = np.zeros(world, dtype=np.int64)
    items = [(math.prod(g.shape) * g.itemsize // len(holders[g.id]), g.id) for g in glob]
    writers: dict[int, np.ndarray] = {}
    for cost, gid in sorted(items, key=lambda x: (-x[0], x[1])):
        rows = holders[gid]
        nrep = rows.shape[1]
        rows = rows[:, (np.arange(nrep) + gid) % nrep]
        pick = rows[np.arange(len(rows)), np.argmin(load[rows], axis=1)]
        np.add.at(load, pick, cost)
        writers[gid] = pick
    return writers


def local_shards(glob: tuple[GlobalLeaf, ...], leaves: list[Leaf], dtensors: dict[int, Any],
                 rank: int, world: int) -> list[tuple[LocalShard, Any]]:
    """The (box, local tensor) pairs this rank writes, in leaf order."""
    holders = box_holders(glob, dtensors, world)
    writers = assign_writers(glob, holders, world)
    out: list[tuple[LocalShard, Any]] = []
    for g in glob:
        if not g.sharded:
            if writers[g.id][0] == rank:
                out.append((LocalShard(g.id, (0,) * len(g.shape), g.shape), leaves[g.id].value))
            continue
        box, _ = np.nonzero(holders[g.id] == rank)
        if len(box) == 0 or writers[g.id][box[0]] != rank:
            continue  # not in the mesh, or another holder of this box writes it
        dt = dtensors[g.id]
        check_contiguous(g.name, dt)
        chunks = dt.__create_chunk_list__()
        if len(chunks) != 1:
            raise UnsupportedTypeError(f"DTensor {g.name!r} has {len(chunks)} local chunks; "
                                       "only one box per rank is supported")
        c = chunks[0]
        if math.prod(c.sizes) == 0:
            continue  # uneven sharding leaves some ranks empty
        out.append((LocalShard(g.id, tuple(c.offsets), tuple(c.sizes)),
                    dt.to_local().detach().reshape(tuple(c.sizes))))
    return out


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
