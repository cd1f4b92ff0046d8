"""Loading sharded checkpoints on any number of ranks: each rank reads only the
chunks that hold the boxes it needs (:mod:`ckptstore.read.boxes`), and of a
distributed save only the rank indexes that list them.

Saved at N ranks, loaded at M: the boxes of the M ranks come from their own DTensors
(``__create_chunk_list__``), so any placement DCP understands works, and M = 1 without
a process group assembles whole tensors.
"""
from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ckptstore import manifest as fmt
from ckptstore.distributed.shards import check_contiguous, holds_dtensor, is_dtensor
from ckptstore.errors import CorruptCheckpointError
from ckptstore.plan.tree import unflatten
from ckptstore.read.boxes import read_boxes
from ckptstore.read.into import Action, StatefulSlot, copy_into, give_state, leaves_of, subtree
from ckptstore.read.reader import read_tensors
from ckptstore.storage import Storage
from ckptstore.storage.base import linked


@dataclass(frozen=True, slots=True)
class Ref:
    """A leaf of the saved tree, not read yet."""

    kind: str  # "tensor" | "ndarray"
    index: int


def _storage_for(storage: Storage, manifest: fmt.Manifest) -> Storage:
    return linked(storage, manifest.files)  # incremental saves name older steps' files


def _refs(manifest: fmt.Manifest) -> Any:
    def leaf(kind: str, i: Any) -> Ref:
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(manifest.tensors):
            raise CorruptCheckpointError(f"state tree refers to tensor {i!r}, which does not exist")
        want = "torch" if kind == "tensor" else "numpy"
        if manifest.tensors[i].kind != want:
            raise CorruptCheckpointError(f"state tree expects a {want} array for tensor {i}")
        return Ref(kind, i)

    return unflatten(manifest.tree, leaf)


def _read_whole(storage: Storage, manifest: fmt.Manifest, refs: list[Ref],
                verify: bool) -> dict[int, Any]:
    """Whole arrays for ``refs``: torch tensors assembled from shards, numpy as saved."""
    torch_ids = sorted({r.index for r in refs if r.kind == "tensor"})
    np_ids = {r.index for r in refs if r.kind != "tensor"}
    manifest = fmt.resolve(storage, manifest, dict.fromkeys([*torch_ids, *np_ids]))
    recs = manifest.tensors
    out = dict(zip(torch_ids, read_boxes(
        storage, manifest, [(i, (0,) * len(recs[i].shape), recs[i].shape) for i in torch_ids],
        verify=verify)))
    if np_ids:
        ids = {id(recs[i]) for i in np_ids}
        out.update(read_tensors(_storage_for(storage, manifest), manifest, verify=verify,
                                select=lambda r: id(r) in ids))
    return out


def _substitute(tree: Any, values: Callable[[Ref], Any]) -> Any:
    if isinstance(tree, Ref):
        return values(tree)
    if isinstance(tree, dict):
        out = type(tree)()
        for k, v in tree.items():
            out[k] = _substitute(v, values)
        return out
    if isinstance(tree, list):
        return [_substitute(v, values) for v in tree]
    if isinstance(tree, tuple):
        return tuple(_substitute(v, values) for v in tree)
    if isinstance(tree, argparse.Namespace):
        return argparse.Namespace(**{k: _substitute(v, values) for k, v in vars(tree).items()})
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):  # rebuilt as plan.values does
        obj: Any = object.__new__(type(tree))  # type: ignore[arg-type]
        for f in dataclasses.fields(tree):
            object.__setattr__(obj, f.name, _substitute(getattr(tree, f.name), values))
        return obj
    return tree


def _refs_in(tree: Any) -> list[Ref]:
    """Every array reference in ``tree``, typed values (dataclasses, namespaces) included."""
    found: list[Ref] = []

    def keep(r: Ref) -> Ref:
        found.append(r)
        return r

    _substitute(tree, keep)
    return found


def load_resharded(storage: Storage, manifest: fmt.Manifest, *, into: Any = None,
                   strict: bool = True, verify: bool = True, cast: bool = False) -> Any:
    """``ckptstore.load`` for sharded checkpoints and/or DTensor targets.

    Without ``into``: the whole tree with whole tensors. With ``into`` (a state dict
    or module, DTensors allowed): each DTensor receives only its local box, read from
    the chunks that hold it; returns a :class:`LoadReport`.
    """
    tree = _refs(manifest)
    if into is None:
        refs = _refs_in(tree)
        whole = _read_whole(storage, manifest, refs, verify)
        return _substitute(tree, lambda r: whole[r.index])
    if isinstance(into, torch.nn.Module):
        into = into.state_dict()
    # as DCP does: a Stateful object whose state holds DTensors has its state_dict() as
    # the target (the DTensors receive their boxes in place), then given back through
    # load_state_dict(); any other Stateful object gets its part of the checkpoint whole.
    # Plain dicts from get_state_dict() stay allowed here, as dcp.load allows them:
    # DCP's documented pattern loads into them and then calls set_state_dict().
    objects: list[tuple[Any, Any]] = []
    for value, _parent, _key in leaves_of(into).values():
        if isinstance(value, StatefulSlot):
            sd = value.obj.state_dict()
            if holds_dtensor(sd):
                objects.append((value.obj, sd))
    src = {k: v[0] for k, v in leaves_of(tree).items()}
    dst = leaves_of(into, expand={id(obj): sd for obj, sd in objects})
    slots = {name: v[0].path for name, v in dst.items() if isinstance(v[0], StatefulSlot)}
    for name, path in slots.items():
        for k in [k for k in src if not path or k == name or k.startswith(name + ".")]:
            del src[k]
        found, sub = subtree(tree, path)
        if found:
            src[name] = sub
    boxes: dict[str, Any] = {}
    arrays: dict[int, Any] = {}

    def prepare(actions: list[Action]) -> None:
        """Plan every read first, so all chunks are fetched in one parallel pass."""
        nonlocal manifest
        wanted, names, whole = [], [], []
        for name, value, _parent, _key in actions:
            s = src[name]
            if isinstance(s, Ref) and is_dtensor(value):
                check_contiguous(name, value)  # else the box below would be its first part only
                (c,) = value.__create_chunk_list__()
                wanted.append((s.index, tuple(c.offsets), tuple(c.sizes)))
                names.append(name)
            elif isinstance(s, Ref):
                whole.append(s)
            else:  # the whole part of a Stateful object, or arrays inside a typed value
                whole += _refs_in(s)
        # one pass over the rank indexes holding what this rank reads, in parallel
        want: dict[int, list | None] = dict.fromkeys(r.index for r in whole)
        for i, o, s in wanted:
            if i not in want:
                want.setdefault(i, []).append((o, s))  # type: ignore[union-attr]
            elif want[i] is not None:
                want[i].append((o, s))  # type: ignore[union-attr]
        manifest = fmt.resolve(storage, manifest, want)
        # copied into the targets below and dropped: a box may be a view of a mapped file
        boxes.update(zip(names, read_boxes(storage, manifest, wanted, verify=verify,
                                           transient=True)))
        arrays.update(_read_whole(storage, manifest, whole, verify))

    def resolve(name: str, value: Any) -> tuple[Any, Any]:
        if name in boxes:  # a DTensor receives its own box into its local shard
            local = value.to_local()
            return local, boxes[name].reshape(local.shape)
        return value, _substitute(src[name], lambda r: arrays[r.index])

    report = copy_into(src, dst, strict=strict, cast=cast,
                       unexpected=[k for k in src if k not in dst],
                       compare=lambda s, d, c: _compare(manifest, s, d, c),
                       prepare=prepare, resolve=resolve)
    why = [(type(obj).__name__, w) for obj, state in objects
           if (w := give_state(type(obj).__name__, obj, state, strict))]
    if why:
        report = dataclasses.replace(report, mismatched=report.mismatched + tuple(why))
    return report


def _compare(manifest: fmt.Manifest, src: Any, dst: Any, cast: bool) -> str | None:
    if not isinstance(dst, (torch.Tensor, np.ndarray)):
        return None
    if not isinstance(src, Ref):
        return f"checkpoint holds a {type(src).__name__}, not a tensor"
    rec = manifest.tensors[src.index]
    if tuple(rec.shape) != tuple(dst.shape):
        return f"shape {list(rec.shape)} in checkpoint, {list(dst.shape)} here"
    here = str(dst.dtype).removeprefix("torch.") if isinstance(dst, torch.Tensor) else dst.dtype.str
    if rec.dtype != here and not cast:
        return f"dtype {rec.dtype} in checkpoint, {here} here (pass cast=True to convert)"
    if isinstance(dst, np.ndarray) and rec.kind != "numpy":
        return "checkpoint holds a torch tensor, not a numpy array"
    return None
