"""The state tree of a DCP checkpoint, both ways, in ckptstore's typed JSON.

DCP flattens a state into ``{fqn: value}`` and records each fqn's object path
(``planner_data``: ``("optim", "param_groups", 0, "lr")``). :func:`nest` turns the
flat items a :class:`~ckptstore.distributed.dcp.CkptStoreWriter` stored back into the
nested skeleton DCP was given, the way DCP's own ``set_element`` nests them (str path
keys are dict keys, int path keys list positions), so ``ckptstore.load`` returns the
nested state. :func:`dcp_view` goes the other way for the reader: it flattens the
saved tree of any ckptstore checkpoint with DCP's own planner, so the fqns it serves
are exactly those DCP computes for the load target.

Non-tensor values are typed JSON (:mod:`ckptstore.plan.tree`), never pickle; DCP's
load planner wants the bytes of ``torch.save(value)`` for them, and :func:`save_bytes`
builds those from the decoded value (nothing read from a file is unpickled here).
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import torch

from ckptstore.errors import UnsupportedTypeError
from ckptstore.plan.tree import flatten, unflatten

#: the largest list position a nested path may name (guards absurd planner data)
MAX_INDEX = 1 << 20


def value_json(obj: Any) -> str | None:
    """The typed-JSON text of a non-tensor value, or None when it cannot be stored as
    typed JSON alone (an arbitrary object, or a container holding tensors or arrays)."""
    try:
        node, leaves = flatten(obj)
    except UnsupportedTypeError:
        return None
    return None if leaves else json.dumps(node)


class _Dict(dict):
    """A dict built from object paths (not a typed-JSON node)."""


class _List(list):
    """A list built from object paths (not a typed-JSON node)."""


def _valid(path: Any) -> bool:
    return (isinstance(path, tuple) and bool(path) and isinstance(path[0], str)
            and all(type(k) is str or (type(k) is int and 0 <= k < MAX_INDEX) for k in path))


def _put(root: _Dict, path: tuple, node: Any) -> None:
    """``set_element`` of DCP, on containers of typed-JSON nodes."""
    cur: Any = root
    for key, nxt in zip(path, path[1:]):
        fresh = _Dict() if type(nxt) is str else _List()
        if isinstance(cur, _Dict):
            cur = cur.setdefault(key, fresh)
        else:
            cur.extend([None] * (key + 1 - len(cur)))
            if cur[key] is None:
                cur[key] = fresh
            cur = cur[key]
        if not isinstance(cur, (_Dict, _List)) or isinstance(cur, _List) != (type(nxt) is int):
            raise ValueError(f"object path {path!r} crosses a value")
    last = path[-1]
    if isinstance(cur, _List):
        cur.extend([None] * (last + 1 - len(cur)))
    elif last in cur:
        raise ValueError(f"object path {path!r} is used twice")
    cur[last] = node


def _typed(obj: Any) -> Any:
    if isinstance(obj, _Dict):
        return {"T": "dict", "items": [[k, _typed(v)] for k, v in obj.items()]}
    if isinstance(obj, _List):
        return {"T": "list", "items": [_typed(v) for v in obj]}
    return obj


def nest(nodes: dict[str, Any], planner_data: Any) -> Any:
    """The nested typed-JSON skeleton of ``{fqn: node}`` following DCP's flatten
    mapping ``{fqn: object path}``; the flat dict when there is no usable mapping."""
    flat = {"T": "dict", "items": [[k, v] for k, v in nodes.items()]}
    if not isinstance(planner_data, dict) or any(f not in planner_data for f in nodes):
        return flat
    root = _Dict()
    try:
        for fqn, node in nodes.items():
            path = tuple(planner_data[fqn])
            if not _valid(path):
                return flat
            _put(root, path, node)
    except (ValueError, TypeError):
        return flat
    return _typed(root)


@dataclass(frozen=True, slots=True)
class ArrayLeaf:
    """Stands for numpy array number ``index`` of the tensor table in a decoded tree."""

    index: int


@dataclass(frozen=True, slots=True)
class DcpView:
    """A saved tree as DCP sees it: ``values`` are DCP's flat items (tensor records
    stand as placeholder meta tensors, numpy arrays as :class:`ArrayLeaf`),
    ``mappings`` their object paths, ``tensor_index`` a placeholder's record index."""

    values: dict[str, Any]
    mappings: dict[str, Any]
    tensor_index: dict[int, int]  #: id(placeholder) -> index in the tensor table

    def record_of(self, value: Any) -> int | None:
        """The tensor-table index a flat item stands for, or None for a plain value."""
        if isinstance(value, torch.Tensor):
            return self.tensor_index[id(value)]
        return value.index if isinstance(value, ArrayLeaf) else None


def dcp_view(tree: Any) -> DcpView:
    """Flatten a manifest's tree the way DCP flattens a state (its default planner)."""
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    placeholders: dict[int, Any] = {}

    def leaf(kind: str, i: int) -> Any:
        if i not in placeholders:
            placeholders[i] = torch.empty((), device="meta") if kind == "tensor" else ArrayLeaf(i)
        return placeholders[i]

    state = unflatten(tree, leaf)
    if not isinstance(state, dict):
        raise UnsupportedTypeError(
            f"this checkpoint holds a {type(state).__name__} at its top; DCP loads only dict "
            "states, so load it with ckptstore.load instead")
    planner = DefaultSavePlanner(flatten_state_dict=True, flatten_sharded_tensors=False)
    planner.set_up_planner(state)
    index = {id(p): i for i, p in placeholders.items() if isinstance(p, torch.Tensor)}
    return DcpView(dict(planner.state_dict), dict(planner.mappings), index)


def leaves_in(value: Any, view: DcpView) -> set[int]:
    """The tensor-table indices of the placeholders inside a plain value."""
    found: set[int] = set()

    def walk(v: Any) -> None:
        idx = view.record_of(v)
        if idx is not None:
            found.add(idx)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)

    walk(value)
    return found


def fill(value: Any, view: DcpView, arrays: dict[int, Any]) -> Any:
    """``value`` with every placeholder replaced by its array from ``arrays``."""
    idx = view.record_of(value)
    if idx is not None:
        return arrays[idx]
    if isinstance(value, dict):
        out = type(value)()
        for k, v in value.items():
            out[k] = fill(v, view, arrays)
        return out
    if isinstance(value, list):
        return [fill(v, view, arrays) for v in value]
    if isinstance(value, tuple):
        return tuple(fill(v, view, arrays) for v in value)
    return value


def save_bytes(value: Any) -> io.BytesIO:
    """What DCP's load planner expects for a non-tensor item: ``torch.save(value)``."""
    buf = io.BytesIO()
    torch.save(value, buf)
    buf.seek(0)
    return buf
