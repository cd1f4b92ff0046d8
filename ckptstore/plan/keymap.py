"""Rename rules for loading a checkpoint into code whose key names changed.

Names are the '.'-joined paths of the state tree (``tree.path_name``): a tensor saved
as ``{"model": {"encoder.0.weight": t}}`` is named ``model.encoder.0.weight``.
A rule set is given as one of

* a mapping of prefixes, ``{"model.encoder.": "model.backbone."}``: the longest
  matching prefix wins, so ``{"a.": "x.", "a.b.": "y."}`` sends ``a.b.w`` to ``y.w``;
* a list of regex rules ``[(r"^encoder\\.layers\\.(\\d+)\\.", r"blocks.\\1.")]``: each
  rule is applied in order to the result of the previous one (``re.sub``, count 1);
* a callable ``name -> new name`` (return the name unchanged to keep it, ``None``
  to drop the key from the load).
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Union

RenameSpec = Union[Mapping[str, str], Iterable[tuple[str, str]], Callable[[str], "str | None"], None]


def compile_rename(spec: RenameSpec) -> Callable[[str], "str | None"]:
    """Turn any accepted rename spec into one function ``name -> new name | None``."""
    if spec is None:
        return lambda name: name
    if isinstance(spec, Mapping):
        return _prefix_rule(spec)
    if callable(spec):
        return _checked(spec)
    if isinstance(spec, (str, bytes)):
        raise TypeError("rename must be a mapping of prefixes, a list of (pattern, replacement) "
                        f"pairs or a callable, not the string {spec!r}")
    rules = []
    for item in spec:
        if not (isinstance(item, (tuple, list)) and len(item) == 2
                and all(isinstance(x, str) for x in item)):
            raise TypeError(f"rename rule {item!r} is not a (pattern, replacement) pair of strings")
        try:
            rules.append((re.compile(item[0]), item[1]))
        except re.error as e:
            raise ValueError(f"rename pattern {item[0]!r} is not a valid regex: {e}") from None

    def apply(name: str) -> str:
        for pattern, repl in rules:
            name = pattern.sub(repl, name, count=1)
        return name

    return apply


def _prefix_rule(mapping: Mapping[str, str]) -> Callable[[str], str]:
    for k, v in mapping.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"rename prefix mapping must be str -> str, got {k!r}: {v!r}")
    # longest prefix first: a more specific rule overrides a general one
    ordered = sorted(mapping.items(), key=lambda kv: len(kv[0]), reverse=True)

    def apply(name: str) -> str:
        for old, new in ordered:
            if name.startswith(old):
                return new + name[len(old):]
        return name

    return apply


def _checked(fn: Callable[[str], Any]) -> Callable[[str], "str | None"]:
    def apply(name: str) -> "str | None":
        out = fn(name)
        if out is not None and not isinstance(out, str):
            raise TypeError(f"rename callable returned {out!r} for {name!r}; return a str or None")
        return out

    return apply


def rename_names(names: Iterable[str], spec: RenameSpec) -> tuple[dict[str, str], tuple]:
    """Map every name through ``spec``.

    Returns ``({old: new}, renamed)`` where dropped names are absent from the mapping
    and ``renamed`` lists the ``(old, new)`` pairs that changed. Two names renamed
    onto one raise ValueError: loading either silently would lose data.
    """
    fn = compile_rename(spec)
    out: dict[str, str] = {}
    owner: dict[str, str] = {}
    renamed = []
    for old in names:
        new = fn(old)
        if new is None:
            continue
        if new in owner:
            raise ValueError(f"rename rules map both {owner[new]!r} and {old!r} to {new!r}")
        owner[new] = old
        out[old] = new
        if new != old:
            renamed.append((old, new))
    return out, tuple(renamed)


__all__ = ["RenameSpec", "compile_rename", "rename_names"]
