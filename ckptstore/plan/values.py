"""Typed JSON for the Python values people keep in checkpoints beside tensors.

Paths, enums, dataclasses, ``argparse.Namespace``, sets, dates and times, complex
numbers and ``torch.device`` are stored as tagged JSON nodes of the state tree
(never pickle) and come back as the same types:

=======================================================  ==============================
``{"T":"path","cls":"PosixPath","v":"/a/b"}``             pathlib paths (pure ones too)
``{"T":"enum","cls":"mod:Qual","name":"A","v":node}``     an Enum member
``{"T":"dataclass","cls":"mod:Qual","fields":[[n, node]]}``  a dataclass instance
``{"T":"namespace","items":[[k, node], ...]}``            ``argparse.Namespace``
``{"T":"set"|"frozenset","items":[...]}``                 sets (sorted, so stable)
``{"T":"datetime"|"date"|"time","v":"<isoformat>"}``      ``datetime`` values
``{"T":"timedelta","v":[days, seconds, microseconds]}``
``{"T":"complex","re":"1.0","im":"-2.0"}``
``{"T":"device","v":"cuda:0"}``                           ``torch.device``
=======================================================  ==============================

Enum and dataclass types are looked up by module and qualified name only in modules
that are already imported (loading a checkpoint never imports a module it names);
a dataclass is rebuilt without running its ``__init__``, as ``copy`` and ``pickle``
do. Where the type cannot be found, the value comes back in plain form (an enum's
value, a dataclass's fields as a dict) and a warning says so.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import enum
import logging
import pathlib
import sys
from collections.abc import Callable
from typing import Any

import torch

from ckptstore.errors import CorruptCheckpointError
from ckptstore.manifest.treetags import VALUE_TAGS, check_value_node

log = logging.getLogger(__name__)

TAGS = VALUE_TAGS

_PATHS: dict[str, type] = {"PosixPath": pathlib.Path, "WindowsPath": pathlib.Path, "Path": pathlib.Path,
                           "PurePosixPath": pathlib.PurePosixPath,
                           "PureWindowsPath": pathlib.PureWindowsPath, "PurePath": pathlib.PurePath}

Visit = Callable[[Any], Any]


def type_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def encode(obj: Any, visit: Visit) -> Any | None:
    """The typed node of ``obj``, or None when it is none of these types.

    ``visit`` encodes a nested value (its path and depth are the caller's).
    """
    if isinstance(obj, enum.Enum):
        return {"T": "enum", "cls": type_name(type(obj)), "name": obj.name, "v": visit(obj.value)}
    if isinstance(obj, pathlib.PurePath):
        return {"T": "path", "cls": type(obj).__name__, "v": str(obj)}
    if isinstance(obj, complex):
        return {"T": "complex", "re": repr(obj.real), "im": repr(obj.imag)}
    if isinstance(obj, torch.device):
        return {"T": "device", "v": str(obj)}
    if isinstance(obj, dt.datetime):  # before date: a datetime is a date
        return {"T": "datetime", "v": obj.isoformat()}
    if isinstance(obj, dt.date):
        return {"T": "date", "v": obj.isoformat()}
    if isinstance(obj, dt.time):
        return {"T": "time", "v": obj.isoformat()}
    if isinstance(obj, dt.timedelta):
        return {"T": "timedelta", "v": [obj.days, obj.seconds, obj.microseconds]}
    if isinstance(obj, (set, frozenset)):
        items = sorted(obj, key=lambda v: (type(v).__name__, repr(v)))
        return {"T": "frozenset" if isinstance(obj, frozenset) else "set", "items": [visit(v) for v in items]}
    if isinstance(obj, argparse.Namespace):
        return {"T": "namespace", "items": [[k, visit(v)] for k, v in vars(obj).items()]}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {"T": "dataclass", "cls": type_name(type(obj)),
                "fields": [[f.name, visit(getattr(obj, f.name))] for f in dataclasses.fields(obj)]}
    return None


def decode(t: str, node: dict, build: Visit) -> Any:
    """Rebuild the value of typed node ``node`` (tag ``t``, one of :data:`TAGS`)."""
    check_value_node(t, node)  # the same shape checks as fsck
    if t == "path":
        cls = _PATHS.get(node["cls"])
        if cls is None:
            raise CorruptCheckpointError(f"unknown path type {node['cls']!r}")
        return cls(_str(node["v"]))
    if t == "enum":
        value = build(node["v"])
        ecls: Any = _find(node["cls"], lambda c: issubclass(c, enum.Enum))
        if ecls is not None and node["name"] in ecls.__members__:
            return ecls.__members__[node["name"]]
        _lost(node["cls"], "enum", "its value")
        return value
    if t == "dataclass":
        fields = {_str(k): build(v) for k, v in node["fields"]}
        dcls: Any = _find(node["cls"], dataclasses.is_dataclass)
        if dcls is None or {f.name for f in dataclasses.fields(dcls)} != set(fields):
            _lost(node["cls"], "dataclass", "a dict of its fields")
            return fields
        obj: Any = object.__new__(dcls)  # as copy and pickle do: no user code runs
        for k, v in fields.items():
            object.__setattr__(obj, k, v)
        return obj
    if t == "namespace":
        return argparse.Namespace(**{_str(k): build(v) for k, v in node["items"]})
    if t in ("set", "frozenset"):
        items = [build(v) for v in node["items"]]
        return set(items) if t == "set" else frozenset(items)
    if t == "datetime":
        return dt.datetime.fromisoformat(_str(node["v"]))
    if t == "date":
        return dt.date.fromisoformat(_str(node["v"]))
    if t == "time":
        return dt.time.fromisoformat(_str(node["v"]))
    if t == "timedelta":
        days, seconds, micros = (_int(v) for v in node["v"])
        return dt.timedelta(days=days, seconds=seconds, microseconds=micros)
    if t == "complex":
        return complex(float(_str(node["re"])), float(_str(node["im"])))
    if t == "device":
        return torch.device(_str(node["v"]))
    raise CorruptCheckpointError(f"unknown tree node type {t!r}")


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError(f"expected a string, found {type(v).__name__}")
    return v


def _int(v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError(f"expected an integer, found {type(v).__name__}")
    return v


def _find(spec: Any, accept: Callable[[type], bool]) -> type | None:
    """The class named ``module:qualname`` if its module is already imported."""
    mod, _, qual = _str(spec).partition(":")
    obj: Any = sys.modules.get(mod)
    for part in qual.split(".") if obj is not None and qual else ():
        if part.startswith("__") or part == "<locals>":
            return None
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, type) and accept(obj) else None


_warned: set[str] = set()


def _lost(spec: str, what: str, form: str) -> None:
    if spec not in _warned:
        _warned.add(spec)
        log.warning("%s %s is not available (its module is not imported, or the type changed); "
                    "it loads as %s: import its module before loading to get the type back",
                    what, spec, form)
