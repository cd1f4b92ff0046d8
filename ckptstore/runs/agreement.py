"""Agreement between the ranks of a collective Checkpointer: rank 0 decides, every
rank gets the answer (or an error of the same type naming rank 0)."""
from __future__ import annotations

import builtins
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from ckptstore import errors as _errors
from ckptstore.errors import DistributedSaveError


def world_size() -> int:
    """Ranks in the initialized default process group, 0 if there is none."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_world_size()


class Agreement:
    """``agree`` and ``exchange`` for one Checkpointer; both are plain calls when it
    is not collective."""

    def __init__(self, collective: bool) -> None:
        self.collective = collective
        #: rank 0 of a collective Checkpointer (or the only process) owns the run directory
        self.coordinator = not collective or dist.get_rank() == 0

    def agree(self, fn: Callable[[], Any], what: str) -> Any:
        """Run ``fn`` on the coordinator only and give every rank its result.

        If ``fn`` raises, rank 0 raises that error itself and the other ranks raise
        one of the same type (or :class:`DistributedSaveError`) naming rank 0."""
        if not self.collective:
            return fn()
        from ckptstore.commit import twophase as pc

        group = pc.coordination_group()
        if self.coordinator:
            try:
                value = fn()
            except Exception as e:
                pc.broadcast(("error", type(e).__name__, str(e)), group)
                raise
            return pc.broadcast(("ok", value), group)[1]
        got = pc.broadcast(None, group)
        if got[0] == "ok":
            return got[1]
        raise rebuild_error(got[1], f"rank 0 failed {what}: {got[2]}", 0, "checkpointer")

    def exchange(self, value: Any) -> list:
        """Every rank's ``value``, in rank order (just ``[value]`` alone)."""
        if not self.collective:
            return [value]
        from ckptstore.commit import twophase as pc

        out: list = [None] * dist.get_world_size()
        dist.all_gather_object(out, value, group=pc.coordination_group())
        return out


def rebuild_error(name: str, message: str, rank: int, phase: str) -> Exception:
    """Another rank's error, raised here with the same type where it is one of ours
    or a builtin (constructible from a message); else a DistributedSaveError."""
    cls = getattr(_errors, name, None) or getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception) and (
            issubclass(cls, _errors.CkptError) or cls.__module__ == "builtins"):
        try:
            return cls(message)
        except TypeError:  # a constructor that wants more than a message
            pass
    return DistributedSaveError(message, ((rank, phase, name, message),))
