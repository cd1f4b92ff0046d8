"""``load(..., into=...)``: copy a loaded tree into existing tensors and containers."""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ckptstore.errors import StrictLoadError, UnsupportedTypeError
from ckptstore.plan.keymap import RenameSpec, rename_names
from ckptstore.plan.stateful import is_stateful, state_dict_kind
from ckptstore.plan.tree import path_name

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LoadReport:
    """What ``load(into=...)`` did with each key (names are '.'-joined paths).

    ``loaded``, ``missing`` and ``mismatched`` use the target's names; ``unexpected``
    uses the checkpoint's own names (before renaming), since those are what a rename
    rule has to match; ``renamed`` holds the ``(checkpoint name, target name)`` pairs
    that rename rules changed.
    """

    loaded: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()  #: in ``into`` but not in the checkpoint
    unexpected: tuple[str, ...] = ()  #: in the checkpoint but not in ``into``
    mismatched: tuple[tuple[str, str], ...] = ()  #: (key, why) pairs: shape or dtype differ
    renamed: tuple[tuple[str, str], ...] = field(default=())  #: (old, new) pairs applied by rename rules

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self, limit: int | None = 20) -> str:
        """One line per category; at most ``limit`` names each (None: all of them)."""
        def cut(items: list) -> tuple[list, str]:
            if limit is None or len(items) <= limit:
                return items, ""
            return items[:limit], f" ... and {len(items) - limit} more"

        parts = [f"{len(self.loaded)} loaded"]
        for label, items in (("missing", self.missing), ("unexpected", self.unexpected)):
            if items:
                shown, more = cut(list(items))
                parts.append(f"{len(items)} {label}: {', '.join(shown)}{more}")
        if self.mismatched:
            shown, more = cut(list(self.mismatched))
            parts.append(f"{len(self.mismatched)} mismatched: "
                         + "; ".join(f"{k} ({why})" for k, why in shown) + more)
        if self.renamed:
            shown, more = cut(list(self.renamed))
            parts.append(f"{len(self.renamed)} renamed: "
                         + ", ".join(f"{a} -> {b}" for a, b in shown) + more)
        return ", ".join(parts)


@dataclass(frozen=True, slots=True)
class StatefulSlot:
    """A Stateful object of the target (not a module): it is given its whole part of
    the checkpoint through ``load_state_dict``."""

    obj: Any
    path: tuple[Any, ...]


def leaves_of(tree: Any, path: tuple = (), expand: Mapping[int, Any] | None = None
              ) -> dict[str, tuple[Any, Any, Any]]:
    """Flatten containers to {name: (value, parent container, key in parent)}.

    A module stands for its ``state_dict()`` (whose tensors are its parameters and
    buffers); any other Stateful object is one :class:`StatefulSlot` leaf, unless
    ``expand`` maps its ``id`` to a target to walk in its place (its state dict, filled
    in place). The containers of ``tree`` itself are the parents: nothing is copied.
    """
    out: dict[str, tuple[Any, Any, Any]] = {}

    def walk(node: Any, path: tuple, parent: Any, key: Any) -> None:
        if isinstance(node, torch.nn.Module):
            # state_dict() tensors share storage with the parameters: copy_ fills the model
            node = node.state_dict()
        elif is_stateful(node):
            if expand is None or id(node) not in expand:
                out[path_name(path)] = (StatefulSlot(node, path), parent, key)
                return
            node = expand[id(node)]
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


def compare_values(src: Any, dst: Any, cast: bool) -> str | None:
    """Why the loaded value ``src`` cannot go into the target ``dst``, or None."""
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


#: (target name, target value, its parent container, its key in the parent)
Action = tuple[str, Any, Any, Any]


def copy_into(src: Mapping[str, Any], dst: Mapping[str, tuple[Any, Any, Any]], *, strict: bool,
              cast: bool, unexpected: Sequence[str] = (), renamed: tuple = (),
              compare: Callable[[Any, Any, bool], str | None] = compare_values,
              prepare: Callable[[list[Action]], None] | None = None,
              resolve: Callable[[str, Any], tuple[Any, Any]] | None = None) -> LoadReport:
    """The one copy-into-target path, for whole and resharded loads.

    ``src`` maps target names to what the checkpoint holds for them (values, or
    references that ``resolve`` turns into data); ``dst`` is ``leaves_of(target)``.
    Every target key is matched and checked with ``compare`` first; with ``strict``
    nothing is modified unless all match. Then ``prepare(actions)`` may fetch
    everything in one pass, and each value is copied: in place into tensors and
    arrays (``resolve(name, target)`` may give another destination, e.g. a
    DTensor's local shard, with the data for it), by assignment into dicts and lists.
    """
    missing: list[str] = []
    mismatched: list[tuple[str, str]] = []
    actions: list[Action] = []
    for name, (value, parent, key) in dst.items():
        if name not in src:
            missing.append(name)
            continue
        why = compare(src[name], value, cast)
        if why:
            mismatched.append((name, why))
            continue
        actions.append((name, value, parent, key))
    tied = _tied(missing, dst, actions)
    missing = [m for m in missing if m not in tied]
    report = LoadReport((), tuple(missing), tuple(unexpected), tuple(mismatched), renamed)
    if strict and not report.ok:
        raise StrictLoadError("checkpoint does not match the target (pass strict=False to load "
                              f"what matches, or rename= rules): {report.summary(limit=None)}",
                              report)
    if prepare is not None:
        prepare(actions)
    loaded: list[str] = []
    # Stateful objects first: one that refuses its state fails the load before any
    # tensor of the target was written
    for name, value, _parent, _key in actions:
        if isinstance(value, StatefulSlot):
            part = resolve(name, value)[1] if resolve is not None else src[name]
            why = give_state(name, value.obj, part, strict)
            if why:
                mismatched.append((name, why))
            else:
                loaded.append(name)
    with torch.no_grad():
        for name, value, parent, key in actions:
            if isinstance(value, StatefulSlot):
                continue
            target, s = resolve(name, value) if resolve is not None else (value, src[name])
            if isinstance(target, torch.Tensor):
                s = torch.from_numpy(s) if isinstance(s, np.ndarray) else s
                target.copy_(s.to(dtype=target.dtype) if cast else s)
            elif isinstance(target, np.ndarray):
                np.copyto(target, s, casting="unsafe" if cast else "no")
            elif isinstance(parent, (dict, list)):
                parent[key] = s
            elif parent is not None and value != s:
                mismatched.append((name, "cannot replace a value inside a tuple"))
                continue
            loaded.append(name)
    loaded += tied  # the same memory as a tensor loaded above
    report = LoadReport(tuple(loaded), tuple(missing), tuple(unexpected), tuple(mismatched), renamed)
    if not report.ok:
        log.warning("partial load: %s", report.summary())
    return report


def apply_into(state: Any, into: Any, *, strict: bool = True, cast: bool = False,
               rename: RenameSpec = None,
               target_filter: Callable[[str], bool] | None = None) -> LoadReport:
    """Copy ``state`` into ``into``; nothing is modified if strict checks fail.

    ``rename`` maps the checkpoint's names onto the target's (see
    :mod:`ckptstore.plan.keymap`). ``target_filter`` limits the load to the target keys
    it accepts (partial loads): other keys are neither loaded nor reported missing.
    With ``strict=False`` whatever matches is loaded and a report that is not clean is
    logged as a warning; shape mismatches are never loaded, dtype differences only
    with ``cast=True``.
    """
    refuse_state_dict_copies(into)
    dst = leaves_of(into)
    if target_filter is not None:
        dst = {k: v for k, v in dst.items() if target_filter(k)}
    slots = {name: v[0].path for name, v in dst.items() if isinstance(v[0], StatefulSlot)}
    src_leaves = {k: v[0] for k, v in leaves_of(state).items()}
    claimed: dict[str, Any] = {}  # the part of the checkpoint each Stateful object takes whole
    for name, path in slots.items():
        found, sub = subtree(state, path)
        inside = [k for k in src_leaves if not path or k == name or k.startswith(name + ".")]
        for k in inside:
            del src_leaves[k]
        if found:
            claimed[name] = sub
    mapping, renamed = rename_names(src_leaves, rename)
    src = {new: src_leaves[old] for old, new in mapping.items()}
    src.update(claimed)
    unexpected = [old for old, new in mapping.items() if new not in dst]
    return copy_into(src, dst, strict=strict, cast=cast, unexpected=unexpected, renamed=renamed)


def subtree(tree: Any, path: tuple) -> tuple[bool, Any]:
    """(True, the value at ``path`` of a nested tree) or (False, None)."""
    node = tree
    for k in path:
        if isinstance(node, dict) and k in node:
            node = node[k]
        elif isinstance(node, (list, tuple)) and isinstance(k, int) and -len(node) <= k < len(node):
            node = node[k]
        else:
            return False, None
    return True, node


def refuse_state_dict_copies(into: Any) -> None:
    """Refuse an optimizer's, scheduler's or scaler's ``state_dict()`` given as a target:
    loading into that copy would leave the object itself unchanged."""
    def walk(node: Any, path: tuple, depth: int) -> None:
        what = state_dict_kind(node)
        if what:
            where = "".join(f"[{k!r}]" for k in path) or " itself"
            raise UnsupportedTypeError(
                f"into{where} is a copy of {what}'s state_dict(): loading into it would leave "
                f"the {what.split()[-1]} unchanged; pass the object itself (e.g. into={{'optim': "
                "optimizer}), whose load_state_dict() is then called")
        if depth < 64 and isinstance(node, dict):
            for k, v in node.items():
                walk(v, path + (k,), depth + 1)
        elif depth < 64 and isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, path + (i,), depth + 1)

    walk(into, (), 0)


def give_state(name: str, obj: Any, state: Any, strict: bool) -> str | None:
    """Give ``obj`` its state; why it refused it (strict: raised instead), or None."""
    try:
        obj.load_state_dict(state)
    except Exception as e:  # noqa: BLE001 - any refusal becomes a typed, named error
        why = f"{type(obj).__name__}.load_state_dict refused the checkpoint's state: {type(e).__name__}: {e}"
        if strict:
            raise StrictLoadError(f"{name}: {why}") from e
        return why
    return None


def _tied(missing: list[str], dst: Mapping[str, tuple[Any, Any, Any]], actions: list[Action]) -> list[str]:
    """The missing target tensors that are the very same memory as a tensor being loaded
    (tied weights: a checkpoint may hold them once)."""
    def key(t: Any) -> tuple | None:
        if not isinstance(t, torch.Tensor) or type(t) is not torch.Tensor or t.numel() == 0:
            return None
        return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)

    loading = {key(value) for _n, value, _p, _k in actions} - {None}
    return [m for m in missing if key(dst[m][0]) in loading] if loading else []


def rename_tree(state: Any, rename: RenameSpec) -> tuple[Any, tuple]:
    """Rename the keys of ``state`` without a target (``load(path, rename=...)``).

    A rule may change a leaf's key inside its own dict (the state_dict case:
    ``model.encoder.0.weight`` -> ``model.backbone.0.weight`` renames the key
    ``encoder.0.weight`` of the ``model`` dict). Moving a leaf to another container
    is ambiguous without a target and raises ValueError: load with ``into=`` instead.
    A rule that returns None drops the leaf. Returns (new tree, renamed pairs).
    """
    leaves = leaves_of(state)
    mapping, renamed = rename_names(leaves, rename)
    if not renamed and len(mapping) == len(leaves):
        return state, renamed
    new_keys: dict[int, dict] = {}  # id(parent dict) -> {old key: new key or None}
    for name, (_value, parent, key) in leaves.items():
        new = mapping.get(name)
        if new == name:
            continue
        if not isinstance(parent, dict):
            raise ValueError(f"rename of {name!r} needs to change a list or tuple position; "
                             "load with into= to rename it")
        if new is None:
            new_keys.setdefault(id(parent), {})[key] = None
            continue
        prefix = name[:len(name) - len(str(key))]
        if not (isinstance(key, str) and new.startswith(prefix) and len(new) > len(prefix)):
            raise ValueError(f"rename of {name!r} to {new!r} moves it out of its container "
                             f"{prefix.rstrip('.') or '<root>'!r}; load with into= to rename it")
        new_keys.setdefault(id(parent), {})[key] = new[len(prefix):]
    return _rebuild(state, new_keys), renamed


def _rebuild(node: Any, new_keys: dict[int, dict]) -> Any:
    if isinstance(node, dict):
        changes = new_keys.get(id(node), {})
        out = type(node)()
        for k, v in node.items():
            nk = changes.get(k, k)
            if k in changes and nk is None:
                continue
            if nk in out:
                raise ValueError(f"rename gives two entries the key {nk!r}")
            out[nk] = _rebuild(v, new_keys)
        return out
    if isinstance(node, list):
        return [_rebuild(v, new_keys) for v in node]
    if isinstance(node, tuple) and not isinstance(node, torch.Size):
        return tuple(_rebuild(v, new_keys) for v in node)
    return node
