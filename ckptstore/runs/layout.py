"""A run's layout: one directory per step, named so that names sort by step; a step
is committed when its directory holds a manifest."""
from __future__ import annotations

import re

from ckptstore import manifest as fmt
from ckptstore.storage import Storage

STEP_PREFIX = "step-"
STEP_DIGITS = 12
STEP_RE = re.compile(r"^step-(\d{12})$")


def step_name(step: int) -> str:
    """Directory name of ``step``; zero-padded so that names sort by step."""
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < 10 ** STEP_DIGITS:
        raise ValueError(f"step must be an integer in [0, 10**{STEP_DIGITS}), not {step!r}")
    return f"{STEP_PREFIX}{step:0{STEP_DIGITS}d}"


def parse_step(name: str) -> int | None:
    """The step of a step directory name, or None for anything else."""
    m = STEP_RE.match(name)
    return int(m.group(1)) if m else None


def committed_steps(root: Storage) -> list[int]:
    """The steps below run directory ``root`` whose manifest is in place, ascending
    (not verified)."""
    out = []
    for entry in root.listdir():
        s = parse_step(entry)
        if s is not None and root.child(entry).exists(fmt.MANIFEST_NAME):
            out.append(s)
    return sorted(out)


def read_step(root: Storage, step: int, *, catalog: bool = False) -> fmt.Manifest:
    """The manifest of ``step`` below ``root`` (read, migrated and validated); with
    ``catalog``, without reading a distributed save's rank indexes (enough for its
    metadata and tree)."""
    where = root.child(step_name(step))
    return fmt.read_catalog(where) if catalog else fmt.read_manifest(where)
