"""Which committed step an incremental save builds on, and when a save is full."""
from __future__ import annotations

from ckptstore.runs.layout import read_step, step_name
from ckptstore.storage import Storage


class IncrementalChain:
    """Every ``full_every``-th save is full (None: only the first), so no step
    depends on files older than that many saves. After a restart the chain length
    is unknown: a full base starts a chain afresh, an incremental one makes the next
    save full."""

    def __init__(self, full_every: int | None) -> None:
        if full_every is not None and (isinstance(full_every, bool) or not isinstance(full_every, int)
                                       or full_every < 1):
            raise ValueError(f"full_every must be a positive integer or None, not {full_every!r}")
        self.full_every = full_every
        self.length: int | None = None  #: saves since the last full one (None: unknown)

    def base_for(self, root: Storage, committed: list[int], step: int) -> str | None:
        """The step directory the save of ``step`` builds on, or None (a full save)."""
        older = [s for s in committed if s < step]
        if not older:
            return None
        if self.full_every is not None:
            if self.length is None:
                self.length = 1 if _is_full(root, max(older)) else self.full_every
            if self.length >= self.full_every:
                return None
        return step_name(max(older))

    def saved(self, base: str | None) -> None:
        """Record a save made on ``base`` (None: a full save)."""
        self.length = 1 if base is None else (self.length or 0) + 1


def _is_full(root: Storage, step: int) -> bool:
    try:
        return not any(f.base for f in read_step(root, step).files)
    except (OSError, ValueError):
        return False
