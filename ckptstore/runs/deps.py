"""Which other step directories a checkpoint reads: its incremental dependencies.

An incremental save lists files of older steps with ``FileRecord.base`` naming the
directory that physically holds each one (never a chain through another manifest),
so one manifest says everything a step depends on. ``ls``, ``fsck``, ``repair`` and
the Checkpointer's repair all ask here.
"""
from __future__ import annotations

from ckptstore import manifest as fmt


def depends_on(m: fmt.Manifest) -> list[str]:
    """The step directories other than its own whose files ``m`` reads, sorted
    (empty: a full save, complete in its own directory)."""
    return sorted({f.base for f in m.files if f.base})


def holder(m: fmt.Manifest, own: str, file: str) -> str:
    """The directory that holds ``file`` of the checkpoint ``own`` whose manifest is
    ``m``: ``own`` itself, or the older step its record names."""
    for f in m.files:
        if f.name == file:
            return f.base or own
    return own


def describe(deps: list[str]) -> str:
    """``"full"`` or ``"base: step-...08, step-...09"`` for text output."""
    return "base: " + ", ".join(deps) if deps else "full"
