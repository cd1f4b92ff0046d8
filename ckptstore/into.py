"""``load(..., into=...)``: copy a loaded tree into existing tensors and containers."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .errors import StrictLoadError
from .tree import path_name


@dataclass(frozen=True, slots=True)
class LoadReport:
    """What ``load(into=...)`` did with each key (names are '.'-joined paths)."""

    loaded: tuple = ()
    missing: tuple = ()  #: in ``into`` but not in the checkpoint
    unexpected: tuple = ()  #: in the checkpoint but not in ``into``
    mismatched: tuple = ()  #: (key, why) pairs: shape or dtype differ
    renamed: tuple = field(default=())  #: (old, new) pairs applied by rename rules

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        parts = [f"{len(self.loaded)} loaded"]
        for label, items in (("missing", self.missing), ("unexpected", self.unexpected)):
            if items:
                parts.append(f"{len(items)} {label}: {', '.join(items[:20])}"
                             + (" ..." if len(items) > 20 else ""))
        if self.mismatched:
            parts.append(f"{len(self.mismatched)} mismatched: "
                         + "; ".join(f"{k} ({why})" for k, why in self.mismatched[:20]))
        return ", ".join(parts)


def leaves_of(tree: Any, path: tuple = ()) -> dict[str, tuple[Any, Any, Any]]:
    """Flatten containers to {name: (value, parent container, key in parent)}."""
    out: dict[str, tuple[Any, Any, Any]] = {}

    def walk(node: Any, path: tuple, parent: Any, key: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, path + (k,), node, k)
        elif isinstance(node, (list, tuple)) and not isinstance(node, torch.Size):
            for i, v in enumerate(node):
                walk(v, path + (i,), node, i)
        else:
            out[path_name(path)] = (node, parent, key)

    walk(tree, path, None, None)
    return out


def _compare(src: Any, dst: Any, cast: bool) -> str | None:
    if isinstance(dst, torch.Tensor):
        if not isinstance(src, (torch.Tensor, np.ndarray)):
            return f"checkpoint holds a {type(src).__name__}, not a tensor"
        src_shape = tuple(src.shape)
        if src_shape != tuple(dst.shape):
            return f"shape {list(src_shape)} in checkpoint, {list(dst.shape)} here"
        src_dtype = src.dtype if isinstance(src, torch.Tensor) else None
        if src_dtype is not None and src_dtype != dst.dtype and not cast:
            return f"dtype {src_dtype} in checkpoint, {dst.dtype} here (pass cast=True to convert)"
        return None
    if isinstance(dst, np.ndarray):
        if not isinstance(src, np.ndarray) or src.shape != dst.shape:
            return "shape or type differs"
        if src.dtype != dst.dtype and not cast:
            return f"dtype {src.dtype} in checkpoint, {dst.dtype} here"
    return None


def apply_into(state: Any, into: Any, *, strict: bool = True, cast: bool = False,
               renamed: tuple = ()) -> LoadReport:
    """Copy ``state`` into ``into``; nothing is modified if strict checks fail."""
    if isinstance(into, torch.nn.Module):
        into = into.state_dict()
    src = {k: v[0] for k, v in leaves_of(state).items()}
    dst = leaves_of(into)
    loaded, missing, mismatched = [], [], []
    actions = []
    for name, (value, parent, key) in dst.items():
        if name not in src:
            missing.append(name)
            continue
        why = _compare(src[name], value, cast)
        if why:
            mismatched.append((name, why))
            continue
        actions.append((name, value, parent, key))
    unexpected = [k for k in src if k not in dst]
    report = LoadReport(tuple(loaded), tuple(missing), tuple(unexpected), tuple(mismatched), renamed)
    if strict and not report.ok:
        raise StrictLoadError(f"checkpoint does not match the target: {report.summary()}", report)
    with torch.no_grad():
        for name, value, parent, key in actions:
            s = src[name]
            if isinstance(value, torch.Tensor):
                s = torch.from_numpy(s) if isinstance(s, np.ndarray) else s
                value.copy_(s.to(dtype=value.dtype) if cast else s)
            elif isinstance(value, np.ndarray):
                np.copyto(value, s, casting="unsafe" if cast else "no")
            elif isinstance(parent, (dict, list)):
                parent[key] = s
            elif parent is not None and value != s:
                mismatched.append((name, "cannot replace a value inside a tuple"))
                continue
            loaded.append(name)
    return LoadReport(tuple(loaded), tuple(missing), tuple(unexpected), tuple(mismatched), renamed)
