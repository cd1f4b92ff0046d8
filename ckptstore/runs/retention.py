"""Retention: which committed steps a tier keeps, and how to drop the others safely.

Selection is a pure function of the committed steps, their metrics and the policy,
so it can be property-tested without any I/O. Deletion is ordered for crash safety:

1. the manifests of *every* step the round drops are removed first, durably (the
   steps stop being checkpoints; a dropped step may reference files of another
   dropped step, so no data goes while any of them is still committed);
2. then their files that no kept manifest references (incremental saves
   reference files of older steps; those files stay where they are);
3. then each directory, once empty.

A crash between any two of these leaves every kept checkpoint whole; what is left
over is an uncommitted directory that ``ckptstore gc`` removes.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

from ckptstore import manifest as fmt
from ckptstore.storage import Storage

log = logging.getLogger("ckptstore.retention")


@dataclass(frozen=True, slots=True)
class Best:
    """Keep the ``n`` best steps by ``metric`` (``mode`` is "min" or "max")."""

    metric: str
    mode: str = "min"
    n: int = 1

    @classmethod
    def parse(cls, spec: "Best | tuple | list | str | None") -> "Best | None":
        if spec is None or isinstance(spec, Best):
            return spec
        if isinstance(spec, str):
            spec = (spec,)
        b = cls(*spec)
        if b.mode not in ("min", "max") or not isinstance(b.n, int) or b.n < 1:
            raise ValueError(f"keep_best must be (metric, 'min'|'max', n>=1), not {spec!r}")
        return b


@dataclass(frozen=True, slots=True)
class Policy:
    """What one tier keeps. ``None`` everywhere keeps everything."""

    keep_last: int | None = None
    keep_every: int | None = None
    keep_best: Best | None = None

    def __post_init__(self) -> None:
        for what in ("keep_last", "keep_every"):
            v = getattr(self, what)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{what} must be a positive integer or None, not {v!r}")

    @property
    def keeps_all(self) -> bool:
        return self.keep_last is None and self.keep_every is None and self.keep_best is None


def select_keep(steps: dict[int, dict | None], policy: Policy,
                protected: Iterable[int] = ()) -> set[int]:
    """The steps to keep out of ``steps`` ({step: metrics}, committed steps only).

    Always kept: the newest step, every ``protected`` step (for example local
    copies whose promotion has not committed), and whatever the policy names.
    """
    if not steps:
        return set()
    order = sorted(steps)
    if policy.keeps_all:
        return set(order)
    keep = {order[-1]} | (set(protected) & set(order))
    if policy.keep_last:
        keep.update(order[-policy.keep_last:])
    if policy.keep_every:
        keep.update(s for s in order if s % policy.keep_every == 0)
    best = policy.keep_best
    if best is not None:
        metric = [(s, _metric(steps[s], best.metric)) for s in order]
        scored = [(s, v) for s, v in metric if v is not None]
        # ties go to the newer step: it holds the same quality and more training
        scored.sort(key=lambda sv: (sv[1] if best.mode == "min" else -sv[1], -sv[0]))
        keep.update(s for s, _ in scored[:best.n])
    return keep


def _metric(metrics: dict | None, name: str) -> float | None:
    if not isinstance(metrics, dict):
        return None
    v = metrics.get(name)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
        return None
    return float(v)


def referenced_files(root: Storage, manifests: dict[str, fmt.Manifest]) -> set[tuple[str, str]]:
    """(directory, file) pairs that the given committed manifests need."""
    out: set[tuple[str, str]] = set()
    for dirname, m in manifests.items():
        for f in m.files:
            out.add((f.base or dirname, f.name))
    return out


def uncommit(root: Storage, dirname: str) -> None:
    """Remove step ``dirname``'s manifest, durably: it is no longer a checkpoint."""
    d = root.child(dirname)
    d.remove(fmt.MANIFEST_NAME)
    d.fsync_dir()  # the un-commit must be durable before any data goes


def remove_unreferenced(root: Storage, dirname: str, keep_refs: set[tuple[str, str]]) -> None:
    """Remove every file of un-committed step ``dirname`` that no kept manifest
    references, then the directory if it is empty."""
    d = root.child(dirname)
    left = False
    for entry in d.listdir():
        if (dirname, entry) in keep_refs:
            left = True
            continue
        if d.isdir(entry):
            d.rmtree(entry)
        else:
            d.remove(entry)
    d.fsync_dir()
    if not left:
        root.rmtree(dirname)
        root.fsync_dir()
    log.info("retention removed %s/%s%s", root.url, dirname,
             " (files still referenced by newer steps were kept)" if left else "")


def drop_steps(root: Storage, dirnames: list[str], keep_refs: set[tuple[str, str]]) -> None:
    """Drop the steps of one retention round. Every manifest goes first, then the
    data: a step dropped later in the round may reference files of one dropped
    earlier, and must never be left committed without them."""
    for name in dirnames:
        uncommit(root, name)
    for name in dirnames:
        remove_unreferenced(root, name, keep_refs)
