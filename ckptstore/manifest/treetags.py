"""The tags a state tree node may carry, and the shape of each typed-value node.

The state tree is part of the format: :mod:`ckptstore.plan.tree` and
:mod:`ckptstore.plan.values` write and read it, ``fsck`` checks it without torch.
"""
from __future__ import annotations

import datetime as dt
from typing import Any

from ckptstore.errors import CorruptCheckpointError

#: containers, numbers, bytes and arrays (plan/tree.py)
CORE_TAGS = frozenset({"float", "dict", "odict", "list", "tuple", "bytes", "tensor", "ndarray",
                       "npscalar", "dtype"})
#: typed Python values (plan/values.py)
VALUE_TAGS = frozenset({"path", "enum", "dataclass", "namespace", "set", "frozenset", "datetime",
                        "date", "time", "timedelta", "complex", "device"})
TREE_TAGS = CORE_TAGS | VALUE_TAGS
PATH_TYPES = frozenset({"PosixPath", "WindowsPath", "Path", "PurePosixPath", "PureWindowsPath", "PurePath"})


def check_value_node(t: str, node: dict) -> list[Any]:
    """Check the fields of typed-value node ``node`` (tag ``t``); return its child nodes.

    Raises :class:`CorruptCheckpointError` for a malformed node.
    """
    def text(key: str) -> str:
        v = node.get(key)
        if not isinstance(v, str):
            raise CorruptCheckpointError(f"{t!r} node: {key!r} is not a string")
        return v

    def pairs(key: str) -> list[Any]:
        items = node.get(key)
        if not isinstance(items, list) or not all(
                isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) for p in items):
            raise CorruptCheckpointError(f"{t!r} node: {key!r} is not a list of [name, value] pairs")
        return [p[1] for p in items]

    try:
        if t == "path":
            if text("cls") not in PATH_TYPES:
                raise CorruptCheckpointError(f"unknown path type {node['cls']!r}")
            text("v")
            return []
        if t == "enum":
            text("cls"), text("name")
            return [node["v"]]
        if t == "dataclass":
            text("cls")
            return pairs("fields")
        if t == "namespace":
            return pairs("items")
        if t in ("set", "frozenset"):
            if not isinstance(node.get("items"), list):
                raise CorruptCheckpointError(f"{t!r} node: items is not a list")
            return list(node["items"])
        if t in ("datetime", "date", "time"):
            getattr(dt, t).fromisoformat(text("v"))
            return []
        if t == "timedelta":
            v = node.get("v")
            if not (isinstance(v, list) and len(v) == 3
                    and all(isinstance(x, int) and not isinstance(x, bool) for x in v)):
                raise CorruptCheckpointError("'timedelta' node: v is not three integers")
            dt.timedelta(days=v[0], seconds=v[1], microseconds=v[2])
            return []
        if t == "complex":
            float(text("re")), float(text("im"))
            return []
        if t == "device":
            text("v")
            return []
    except (ValueError, OverflowError, KeyError) as e:
        if isinstance(e, CorruptCheckpointError):
            raise
        raise CorruptCheckpointError(f"malformed {t!r} node: {e}") from None
    raise CorruptCheckpointError(f"unknown tree node type {t!r}")
