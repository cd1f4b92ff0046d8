"""State tree <-> typed JSON skeleton + flat list of array leaves.

The non-tensor part of a state is stored as typed JSON (never pickle). Every node is
JSON ``null``, ``true``/``false``, a string, an integer, or an object with a ``"T"`` tag:

====================  ===============================================
``{"T":"float","v":"0.1"}``   a Python float (``repr``; ``nan``/``inf`` included)
``{"T":"dict","items":[[k, v], ...]}``  dict (keys are typed nodes; order kept)
``{"T":"odict", ...}``  OrderedDict, same layout
``{"T":"list"|"tuple","items":[...]}``
``{"T":"bytes","b64":"..."}``
``{"T":"tensor","id":N}`` / ``{"T":"ndarray","id":N}``  leaf N of the tensor table
``{"T":"npscalar","dtype":"<f8","hex":"..."}``  numpy scalar
``{"T":"dtype","v":"bfloat16"}``  a torch.dtype value
====================  ===============================================

Paths, enums, dataclasses, namespaces, sets, dates, complex numbers and devices have
tags of their own (:mod:`ckptstore.plan.values`). A Stateful object (one with
``state_dict()`` and ``load_state_dict()``, :mod:`ckptstore.plan.stateful`) is stored
as what its ``state_dict()`` returns.
"""
from __future__ import annotations

import base64
import enum
import pathlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ckptstore.errors import CorruptCheckpointError, UnsafeCheckpointError, UnsupportedTypeError
from ckptstore.manifest.dtypes import numpy_dtype
from ckptstore.manifest.records import TORCH_DTYPES
from ckptstore.plan import values
from ckptstore.plan.stateful import is_stateful

MAX_DEPTH = 128


@dataclass(frozen=True, slots=True)
class Leaf:
    """One array found in the tree: a torch tensor or a numpy array."""

    id: int
    path: tuple[Any, ...]  #: the keys and indices from the root (any JSON-able key)
    value: Any  # torch.Tensor | np.ndarray


#: ints beyond this are refused: Python's int<->str conversion (and so JSON) stops at
#: 4,300 digits by default
MAX_INT_DIGITS = 4000
MAX_INT_BITS = int(MAX_INT_DIGITS * 3.3219280948873626)


#: dict keys a state may use (each comes back as a hashable value of the same type)
KEY_TYPES = (str, int, float, bool, type(None), tuple, enum.Enum, pathlib.PurePath)


def flatten(state: Any, problems: list[tuple[str, str]] | None = None) -> tuple[Any, list[Leaf]]:
    """Return the typed-JSON skeleton of ``state`` and its array leaves.

    Tensors that are the very same view (same storage, offset, shape, stride and
    dtype) become one leaf referenced twice, so aliases load back as one tensor.
    Without ``problems`` the first value that cannot be stored raises
    :class:`UnsupportedTypeError`; with a list, every such value is appended to it
    as ``(name, why)`` and the walk goes on (``ckptstore.check``).
    """
    leaves: list[Leaf] = []
    seen: dict[tuple, int] = {}

    def visit(obj: Any, path: tuple, depth: int) -> Any:
        try:
            return node(obj, path, depth)
        except UnsupportedTypeError as e:
            if problems is None:
                raise
            problems.append((path_name(path), str(e)))
            return None

    def node(obj: Any, path: tuple, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise UnsupportedTypeError(f"state nests deeper than {MAX_DEPTH} levels at {_fmt(path)}")
        if isinstance(obj, torch.Tensor):  # first: the common leaf of large states
            return {"T": "tensor", "id": leaf(obj, path)}
        if type(obj) is str:
            return obj
        if isinstance(obj, enum.Enum):  # before int and str: IntEnum and StrEnum members
            return values.encode(obj, lambda v: visit(v, path, depth + 1))
        if isinstance(obj, np.generic):  # before float/int: np.float64 subclasses float
            arr = np.asarray(obj)
            if arr.dtype.hasobject:
                raise UnsupportedTypeError(f"numpy object scalar at {_fmt(path)}")
            return {"T": "npscalar", "dtype": arr.dtype.str, "hex": arr.tobytes().hex()}
        if obj is None or isinstance(obj, (bool, str)):
            return obj
        if isinstance(obj, int) and not isinstance(obj, bool):
            if obj.bit_length() > MAX_INT_BITS:  # JSON could not write it (nor read it back)
                raise UnsupportedTypeError(
                    f"int at {_fmt(path)} has more than {MAX_INT_DIGITS} digits; store it as "
                    "a string, bytes or a tensor")
            return int(obj)
        if isinstance(obj, float):
            return {"T": "float", "v": repr(float(obj))}
        if isinstance(obj, np.ndarray):
            if obj.dtype.hasobject or obj.dtype.fields is not None:
                raise UnsupportedTypeError(
                    f"numpy array at {_fmt(path)} has dtype {obj.dtype}; only plain numeric, "
                    "bool and fixed-width string arrays can be stored without pickle")
            return {"T": "ndarray", "id": leaf(obj, path)}
        if isinstance(obj, (bytes, bytearray)):
            return {"T": "bytes", "b64": base64.b64encode(bytes(obj)).decode("ascii")}
        if isinstance(obj, torch.dtype):
            return {"T": "dtype", "v": str(obj).removeprefix("torch.")}
        if isinstance(obj, dict):
            tag = "odict" if isinstance(obj, OrderedDict) else "dict"
            items = []
            for k, v in obj.items():
                if not isinstance(k, KEY_TYPES):
                    raise UnsupportedTypeError(f"dict key {k!r} at {_fmt(path)} has type {type(k).__name__}")
                items.append([visit(k, path, depth + 1), visit(v, path + (k,), depth + 1)])
            return {"T": tag, "items": items}
        if isinstance(obj, (list, tuple)):  # namedtuples and torch.Size become tuples
            tag = "list" if isinstance(obj, list) else "tuple"
            return {"T": tag, "items": [visit(v, path + (i,), depth + 1) for i, v in enumerate(obj)]}
        if is_stateful(obj):  # modules, optimizers, schedulers, user objects
            return visit(obj.state_dict(), path, depth + 1)
        typed = values.encode(obj, lambda v: visit(v, path, depth + 1))
        if typed is not None:
            return typed
        raise UnsupportedTypeError(
            f"cannot store a {type(obj).__module__}.{type(obj).__qualname__} at {_fmt(path)} "
            "without pickle; convert it to tensors, numbers, strings or containers, or give "
            "it state_dict() and load_state_dict() methods (see ckptstore.check)")

    def leaf(arr: Any, path: tuple) -> int:
        if isinstance(arr, torch.Tensor):
            if arr.is_nested or arr.is_meta:
                raise UnsupportedTypeError(
                    f"tensor at {_fmt(path)} is a {'nested' if arr.is_nested else 'meta'} tensor, "
                    "which has no bytes to save; materialise it first (e.g. .to_padded_tensor(0) "
                    "or a real device)")
            if arr.is_sparse or arr.layout != torch.strided:
                raise UnsupportedTypeError(f"tensor at {_fmt(path)} has layout {arr.layout}; "
                                           "convert it with .to_dense() first")
            if arr.is_quantized or str(arr.dtype).removeprefix("torch.") not in TORCH_DTYPES:
                raise UnsupportedTypeError(
                    f"tensor at {_fmt(path)} has dtype {arr.dtype}, which a checkpoint cannot "
                    "hold safely (quantized, bit-container and sub-byte dtypes); convert it, "
                    "e.g. with .int_repr() or .view(torch.uint8)")
            key: tuple[Any, ...] = ("t", arr.untyped_storage().data_ptr() if arr.numel() else id(arr),
                   arr.storage_offset(), arr.shape, arr.stride(), arr.dtype, arr.device)
        else:
            key = ("n", arr.__array_interface__["data"][0] if arr.size else id(arr),
                   arr.shape, arr.strides, arr.dtype.str)
        if key in seen:
            return seen[key]
        i = len(leaves)
        seen[key] = i
        leaves.append(Leaf(i, path, arr))
        return i

    return visit(state, (), 0), leaves


def unflatten(skeleton: Any, get_leaf: Callable[[str, int], Any]) -> Any:
    """Rebuild the state from its skeleton; ``get_leaf(kind, id)`` supplies arrays."""

    def build(node: Any, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise UnsafeCheckpointError(f"state tree nests deeper than {MAX_DEPTH} levels")
        if node is None or isinstance(node, (bool, str)):
            return node
        if isinstance(node, int):
            return node
        if not isinstance(node, dict) or not isinstance(node.get("T"), str):
            raise CorruptCheckpointError(f"malformed tree node: {str(node)[:80]!r}")
        t = node["T"]
        try:
            if t == "float":
                return float(node["v"])
            if t in ("dict", "odict"):
                out = OrderedDict() if t == "odict" else {}
                for k, v in node["items"]:
                    key = build(k, depth + 1)
                    if not isinstance(key, KEY_TYPES):  # unhashable: a list, a set
                        raise CorruptCheckpointError(f"dict key may not be a {type(key).__name__}")
                    out[key] = build(v, depth + 1)
                return out
            if t == "list":
                return [build(v, depth + 1) for v in node["items"]]
            if t == "tuple":
                return tuple(build(v, depth + 1) for v in node["items"])
            if t == "bytes":
                return base64.b64decode(node["b64"], validate=True)
            if t in ("tensor", "ndarray"):
                return get_leaf(t, node["id"])
            if t == "npscalar":
                dt = safe_numpy_dtype(node["dtype"])
                raw = bytes.fromhex(node["hex"])
                if len(raw) != dt.itemsize:
                    raise CorruptCheckpointError("numpy scalar has the wrong number of bytes")
                return np.frombuffer(raw, dtype=dt)[0]
            if t == "dtype":
                return torch_dtype(node["v"])
            if t in values.TAGS:
                return values.decode(t, node, lambda v: build(v, depth + 1))
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, CorruptCheckpointError):
                raise
            raise CorruptCheckpointError(f"malformed {t!r} node in the state tree: {e}") from None
        raise CorruptCheckpointError(f"unknown tree node type {t!r}")

    return build(skeleton, 0)


def torch_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``, refusing anything that is not a dtype."""
    dt = getattr(torch, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not isinstance(dt, torch.dtype):
        raise CorruptCheckpointError(f"unknown torch dtype {name!r}; it may need a newer torch")
    return dt


def safe_numpy_dtype(s: str) -> np.dtype:
    """Parse a numpy dtype string, allowing only plain, object-free dtypes."""
    return numpy_dtype(s)  # the one rule, shared with the torch-free fsck


def path_name(path: tuple) -> str:
    """Human-readable name of a leaf: keys joined by '.' (state_dict style)."""
    return ".".join(str(p) for p in path) if path else "<root>"


def _fmt(path: tuple) -> str:
    return repr(path_name(path))

