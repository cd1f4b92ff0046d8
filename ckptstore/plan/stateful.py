"""Stateful objects in a state: anything with ``state_dict()`` and ``load_state_dict()``.

The protocol is DCP's ``Stateful``: modules, optimizers, LR schedulers, GradScaler,
dataloader state, :class:`ckptstore.RNGState` and user objects. ``save`` stores what
``state_dict()`` returns at the object's place in the tree; ``load(into=...)`` gives
the object back its part of the checkpoint through ``load_state_dict``.
"""
from __future__ import annotations

from typing import Any

MAX_DEPTH = 128

#: keys by which a plain dict is recognised as a copy of an object's state_dict(); loading
#: into such a copy cannot change the object, so ``load(into=...)`` refuses it
STATE_DICT_KINDS: tuple[tuple[str, frozenset[str]], ...] = (
    ("an optimizer", frozenset({"state", "param_groups"})),
    ("an LR scheduler", frozenset({"last_epoch", "base_lrs"})),
    ("a GradScaler", frozenset({"scale", "growth_factor", "backoff_factor"})),
)


def is_stateful(obj: Any) -> bool:
    """True for objects (not classes, not containers) with both protocol methods."""
    if isinstance(obj, (dict, list, tuple, str, bytes, type)):
        return False
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


def _is_module(obj: Any) -> bool:
    import torch

    return isinstance(obj, torch.nn.Module)


def holds_stateful(tree: Any, depth: int = 0) -> bool:
    """True if a nested dict/list/tuple holds a Stateful object other than a module."""
    if _is_module(tree) or depth > MAX_DEPTH:
        return False
    if is_stateful(tree):
        return True
    if isinstance(tree, dict):
        return any(holds_stateful(v, depth + 1) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return any(holds_stateful(v, depth + 1) for v in tree)
    return False


def resolve_stateful(tree: Any, depth: int = 0) -> Any:
    """``tree`` with every Stateful object replaced by its ``state_dict()``.

    Containers are rebuilt only where something below them changed, so a plain state
    comes back as the very same object.
    """
    if depth > MAX_DEPTH:
        return tree
    if is_stateful(tree):
        return resolve_stateful(tree.state_dict(), depth + 1)
    if isinstance(tree, dict):
        new = {k: resolve_stateful(v, depth + 1) for k, v in tree.items()}
        if all(new[k] is v for k, v in tree.items()):
            return tree
        out = type(tree)() if type(tree) is not dict and _plain_init(tree) else {}
        out.update(new)
        return out
    if isinstance(tree, (list, tuple)):
        items = [resolve_stateful(v, depth + 1) for v in tree]
        if all(a is b for a, b in zip(items, tree)):
            return tree
        return items if isinstance(tree, list) else tuple(items)
    return tree


def _plain_init(d: dict) -> bool:
    try:
        type(d)()
        return True
    except TypeError:
        return False


def state_dict_kind(d: Any) -> str | None:
    """What object a plain dict looks like the ``state_dict()`` of, or None."""
    if not isinstance(d, dict) or not all(isinstance(k, str) for k in d):
        return None
    keys = set(d)
    for what, needed in STATE_DICT_KINDS:
        if needed <= keys:
            return what
    return None
