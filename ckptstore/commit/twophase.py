"""Two-phase commit of a save written by several ranks.

Protocol (every collective runs on a dedicated gloo group with a timeout, so a rank
that died or hangs turns into an error on the others instead of a hang)::

    phase 1  every rank writes its files, then votes: ok + what it wrote, or the
             phase and error that stopped it          -> gather_object to rank 0
    phase 2  rank 0 writes the global manifest only if every vote is ok (the
             manifest is the commit), then broadcasts the decision to every rank
    outcome  committed: every rank returns; not committed: every rank raises the
             same DistributedSaveError naming the failing ranks and phases, and
             removes its own files

A rank that cannot learn the decision (a collective failed after the votes) keeps
its files: the coordinator may have committed a manifest that names them.
"""
from __future__ import annotations

import datetime as _dt
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from ckptstore.errors import DistributedSaveError

log = logging.getLogger("ckptstore.distributed")

COORDINATOR = 0
DEFAULT_TIMEOUT = 1800.0  #: seconds; gloo's own default, overridden by CKPTSTORE_DIST_TIMEOUT

def timeout_seconds() -> float:
    """The collective timeout: ``CKPTSTORE_DIST_TIMEOUT`` seconds, default 30 minutes."""
    env = os.environ.get("CKPTSTORE_DIST_TIMEOUT")
    return float(env) if env else DEFAULT_TIMEOUT


class CoordinationGroup:
    """The gloo group (all ranks) that carries the protocol.

    A separate gloo group keeps our object collectives off the training backend
    (NCCL would need device tensors) and gives them their own timeout. It lives as
    long as the default process group it was made from: creating a group is a
    collective, so it is made once, on first use by every rank, and made again
    only when the default group (or the timeout) changed."""

    def __init__(self) -> None:
        self._group: Any = None
        self._key: tuple | None = None

    def get(self) -> Any:
        key = (id(dist.group.WORLD), dist.get_world_size(), timeout_seconds())
        if self._group is None or self._key != key:
            self._group = dist.new_group(backend="gloo",
                                         timeout=_dt.timedelta(seconds=timeout_seconds()))
            self._key = key
        return self._group


_coordination = CoordinationGroup()


def coordination_group() -> Any:
    """This process's :class:`CoordinationGroup` for the current default group."""
    return _coordination.get()


#: (rank or None when unknown, phase, error type name, message)
Failure = tuple[int | None, str, str, str]


@dataclass(frozen=True, slots=True)
class Vote:
    """What one rank reports after phase 1."""

    rank: int
    ok: bool
    phase: str
    error: tuple[str, str] | None  # (type name, message)
    payload: Any = None


@dataclass(frozen=True, slots=True)
class Decision:
    """The coordinator's verdict, identical on every rank."""

    committed: bool
    failures: tuple[Failure, ...]  # ((rank, phase, type name, message), ...)
    result: Any = None
    keep_files: bool = False  #: the manifest may be in place: removing files could tear it


class MaybeCommitted(Exception):
    """The manifest write reported an error, but the manifest may be visible."""


def failed_vote(rank: int, phase: str, error: BaseException) -> Vote:
    return Vote(rank, False, phase, (type(error).__name__, str(error)[:2000]))


def error_for(decision: Decision, url: str) -> DistributedSaveError:
    """The one error every rank raises for a decision that did not commit."""
    parts = "; ".join(f"rank {r} failed in {ph}: {t}: {m}" for r, ph, t, m in decision.failures)
    return DistributedSaveError(f"distributed save to {url} was not committed ({parts}); "
                                "the previous checkpoint is untouched", decision.failures)


def broadcast(obj: Any, group: Any) -> Any:
    """Broadcast a small picklable object from the coordinator (collective)."""
    box = [obj]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, COORDINATOR), group=group)
    return box[0]


def decide(group: Any, vote: Vote, commit: Callable[[list], Any]) -> Decision:
    """Run the gather -> commit -> broadcast protocol; ``commit(payloads)`` runs on the
    coordinator only when every vote is ok, and its return value is broadcast.

    Raises DistributedSaveError (phase ``"collective"``) when a collective fails or
    times out; the outcome is then unknown to this rank.
    """
    rank = dist.get_rank()
    coord = dist.get_global_rank(group, COORDINATOR)
    decision: Decision | None = None
    try:
        votes: list | None = [None] * dist.get_world_size(group) if rank == coord else None
        dist.gather_object(vote, votes, dst=coord, group=group)
        if rank == coord:
            assert votes is not None
            failures = tuple((v.rank, v.phase, *v.error) for v in votes if not v.ok)
            if failures:
                decision = Decision(False, failures)
            else:
                try:
                    decision = Decision(True, (), commit([v.payload for v in votes]))
                except Exception as e:  # the manifest write failed: nothing committed
                    log.error("commit of a distributed save failed: %s", e)
                    cause = e.__cause__ if isinstance(e, MaybeCommitted) and e.__cause__ else e
                    decision = Decision(False, ((rank, "commit", type(cause).__name__, str(cause)),),
                                        keep_files=isinstance(e, MaybeCommitted))
        decision = broadcast(decision, group)
    except DistributedSaveError:
        raise
    except Exception as e:  # a rank died, hung past the timeout, or the transport broke
        if decision is not None and decision.committed:
            return decision  # the coordinator committed; only the broadcast failed
        raise DistributedSaveError(
            f"rank {rank}: a collective of the distributed save failed ({type(e).__name__}: "
            f"{e}); another rank died or did not answer within {timeout_seconds():.0f}s",
            ((rank, "collective", type(e).__name__, str(e)[:2000]),)) from e
    assert decision is not None
    return decision
