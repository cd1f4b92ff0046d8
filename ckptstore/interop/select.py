"""Which tensors of a checkpoint an export writes, and under which names.

``--keys``/``--strip-prefix`` select by '.'-joined name. Without them (Hugging Face
export), the model's weights are found from the tree's shape: the tensors at the top
level of the tree (a saved ``model.state_dict()``), or the one top-level entry that
holds tensors once optimizer-like entries are set aside
(``{"model": model.state_dict(), "optim": ...}``). Ambiguous trees are refused with
the ``--keys`` to pass.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from ckptstore.errors import CkptError, KeyNotFoundError
from ckptstore.plan.tree import path_name, unflatten
from ckptstore.read.lazy import KeySpec, LazyCheckpoint, key_filter

#: top-level entries that hold training state, not the model's weights
NOT_WEIGHTS = re.compile(r"optim|sched|scaler|rng|loop|callback|trainer|dataloader|sampler", re.I)


class InteropUsageError(CkptError, ValueError):
    """An export cannot go ahead as asked: the model's tensors are ambiguous, a
    needed config is missing, a bad shard size. The message says which option to
    pass. (A selection that matches nothing raises :class:`KeyNotFoundError`.)"""


@dataclass(frozen=True, slots=True)
class Entry:
    """One tensor to write: its name in the checkpoint, its written name, and its
    position in the manifest's tensor table (aliases share one)."""

    name: str
    out: str
    index: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class Selection:
    entries: tuple[Entry, ...]
    prefix: str | None  #: the top-level entry chosen automatically ("" = the root), else None
    note: str  #: what was chosen and why, for the user


@dataclass(frozen=True, slots=True)
class _Leaf:
    kind: str
    index: int


def select(ckpt: LazyCheckpoint, *, keys: KeySpec = None, strip_prefix: str | None = None,
           auto: bool = False) -> Selection:
    """The torch tensors to export. ``auto`` (no ``keys``/``strip_prefix``) picks the
    model's subtree as described in the module docstring; otherwise every tensor
    ``keys`` selects (all by default), minus those without ``strip_prefix``."""
    if auto and keys is None and strip_prefix is None:
        return _auto(ckpt)
    pick = key_filter(keys)
    names = [n for n in ckpt if (pick is None or pick(n)) and ckpt.info(n).kind == "torch"]
    if strip_prefix:
        names = [n for n in names if n.startswith(strip_prefix)]
    if not names:
        shown = [keys] if isinstance(keys, str) else [] if keys is None or callable(keys) else list(keys)
        asked = " ".join(f"--keys {k}" for k in shown) or "the selection"
        if strip_prefix:
            asked += f" --strip-prefix {strip_prefix}"
        raise KeyNotFoundError(f"{asked.strip()} matches no tensor in {ckpt.storage.url}; {_hint(ckpt)}",
                               keys=tuple(shown) + ((strip_prefix,) if strip_prefix else ()))
    cut = len(strip_prefix or "")
    entries = tuple(_entry(ckpt, n, n[cut:]) for n in names)
    return Selection(entries, None, f"{len(entries)} tensors selected")


def _entry(ckpt: LazyCheckpoint, name: str, out: str) -> Entry:
    info = ckpt.info(name)
    return Entry(name, out, info.index, info.nbytes)


def _skeleton(ckpt: LazyCheckpoint) -> Any:
    return unflatten(ckpt.manifest.tree, lambda kind, i: _Leaf(kind, i))


def _torch_leaves(node: Any, path: tuple) -> list[tuple[tuple, _Leaf]]:
    """(path, leaf) of every torch tensor below ``node``, in tree order."""
    if isinstance(node, _Leaf):
        return [(path, node)] if node.kind == "tensor" else []
    if isinstance(node, dict):
        return [x for k, v in node.items() for x in _torch_leaves(v, path + (k,))]
    if isinstance(node, (list, tuple)):
        return [x for i, v in enumerate(node) for x in _torch_leaves(v, path + (i,))]
    return []


def _candidates(ckpt: LazyCheckpoint) -> dict[Any, list[tuple[tuple, _Leaf]]]:
    """Top-level entries that hold torch tensors (key ``None``: tensors at the root)."""
    root = _skeleton(ckpt)
    if not isinstance(root, dict):
        return {None: _torch_leaves(root, ())} if _torch_leaves(root, ()) else {}
    out: dict[Any, list[tuple[tuple, _Leaf]]] = {}
    for k, v in root.items():
        found = _torch_leaves(v, (k,))
        if found:  # a top-level tensor is part of a flat state dict unless it is "rng" & co
            flat = isinstance(v, _Leaf) and not (str(k).isidentifier() and NOT_WEIGHTS.search(str(k)))
            out.setdefault(None if flat else k, []).extend(found)
    return out


def _hint(ckpt: LazyCheckpoint) -> str:
    tops = [k for k in _candidates(ckpt) if k is not None]
    if not tops:
        return "its tensors are at the top level: pass no --keys"
    return "top-level entries holding tensors: " + ", ".join(map(str, tops)) + \
        f" (e.g. --keys {tops[0]}. --strip-prefix {tops[0]}.)"


def _auto(ckpt: LazyCheckpoint) -> Selection:
    cands = _candidates(ckpt)
    if not cands:
        raise InteropUsageError(f"{ckpt.storage.url} holds no torch tensors to export")
    weights = {k: v for k, v in cands.items() if k is None or not NOT_WEIGHTS.search(str(k))}
    if len(weights) != 1:
        options = " or ".join(f"--keys {k}. --strip-prefix {k}." if k is not None else
                              " ".join(f"--keys {path_name(p)}" for p, _ in weights[k][:3])
                              + (" ..." if len(weights[k]) > 3 else "") for k in weights)
        raise InteropUsageError(
            f"cannot tell which tensors of {ckpt.storage.url} are the model: top-level entries "
            f"{', '.join('<tensors at the root>' if k is None else str(k) for k in cands)}; "
            f"pass {options or '--keys'}")
    (key, leaves), = weights.items()
    skip = len(path_name((key,))) + 1 if key is not None else 0
    entries = []
    for path, leaf in leaves:
        full = path_name(path)
        entries.append(Entry(full, full[skip:], leaf.index, ckpt.manifest.tensors[leaf.index].nbytes))
    others = [str(k) for k in cands if k != key]
    if key is None:
        note = "exporting the tensors at the top level of the checkpoint"
    else:
        note = f"exporting the tensors under {key!r} (names without '{key}.')"
    if others:
        note += f"; left out: {', '.join(others)} (pass --keys to choose others)"
    return Selection(tuple(entries), "" if key is None else str(key), note)


def dedupe_aliases(entries: tuple[Entry, ...], tied_targets: set[str] | None
                   ) -> tuple[list[Entry], list[Entry], dict[str, str]]:
    """Split ``entries`` into (written once, written as copies, {dropped: kept}).

    Names that are one tensor in the checkpoint (ckptstore stores an alias once) are
    tied weights: one name is written and the loader re-ties the others. With
    ``tied_targets`` (the names the model re-ties on load), those are dropped and an
    alias the model does not tie is written as a copy; without it, the first name
    in tree order (the module registered first, e.g. the embedding) is kept.
    """
    groups: dict[int, list[Entry]] = {}
    for e in entries:
        groups.setdefault(e.index, []).append(e)
    keep: list[Entry] = []
    copies: list[Entry] = []
    dropped: dict[str, str] = {}
    for group in groups.values():
        if len(group) == 1:
            keep.append(group[0])
            continue
        if tied_targets is None:
            kept, rest = group[0], group[1:]
        else:
            sources = [e for e in group if e.out not in tied_targets]
            kept = sources[0] if sources else group[0]
            rest = [e for e in group if e is not kept and e.out in tied_targets]
            copies += [e for e in group if e is not kept and e.out not in tied_targets]
        keep.append(kept)
        dropped.update({e.out: kept.out for e in rest})
    order = {e.out: i for i, e in enumerate(entries)}
    keep.sort(key=lambda e: order[e.out])
    return keep, copies, dropped


__all__ = ["Entry", "InteropUsageError", "NOT_WEIGHTS", "Selection", "dedupe_aliases", "select"]


def split_parent(out: str) -> tuple[str, str]:
    """(parent folder or URL, last name) of a local path or URL an export writes."""
    if "://" in out:
        folder, _, name = out.rstrip("/").rpartition("/")
        return folder, name
    folder, name = os.path.split(os.path.abspath(out))
    return folder, name
