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

Before all this, :func:`join` (an all-gather with the shorter join timeout) tells every
rank whether every other one could start. A failed or timed-out collective leaves the
gloo groups unusable; every rank that took part makes new ones at its next save.
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
#: seconds the first collective of a save waits for every rank, overridden by
#: CKPTSTORE_DIST_JOIN_TIMEOUT (and never above the collective timeout)
DEFAULT_JOIN_TIMEOUT = 300.0


def timeout_seconds() -> float:
    """The collective timeout: ``CKPTSTORE_DIST_TIMEOUT`` seconds, default 30 minutes."""
    env = os.environ.get("CKPTSTORE_DIST_TIMEOUT")
    return float(env) if env else DEFAULT_TIMEOUT


def join_timeout_seconds() -> float:
    """How long the first collective of a save (every rank says it is there, and whether
    it could start) waits: ``CKPTSTORE_DIST_JOIN_TIMEOUT`` seconds, default 5 minutes,
    at most :func:`timeout_seconds`. It bounds how long the others wait for a rank that
    never calls ``save`` (hung, or saving alone); a rank that fails before it still
    joins, so its failure reaches the others at once."""
    env = os.environ.get("CKPTSTORE_DIST_JOIN_TIMEOUT")
    return min(float(env) if env else DEFAULT_JOIN_TIMEOUT, timeout_seconds())


class CoordinationGroup:
    """The gloo groups (all ranks) that carry the protocol.

    A separate gloo group keeps our object collectives off the training backend
    (NCCL would need device tensors) and gives them their own timeout; a second one,
    with the shorter join timeout, carries only the first collective of a save.
    Creating a group is a collective, so they are made on first use by every rank,
    and made again when the default group (or a timeout) changed, or after a
    collective on them failed: gloo cannot reuse a group once an operation timed out
    or lost a peer, and a failed collective fails on every rank that took part, so
    every rank rebuilds at its next save."""

    def __init__(self) -> None:
        self._groups: tuple[Any, Any] | None = None
        self._key: tuple | None = None
        self._dead = False

    def _current(self) -> tuple[Any, Any]:
        key = (id(dist.group.WORLD), dist.get_world_size(), timeout_seconds(),
               join_timeout_seconds())
        if self._groups is None or self._key != key or self._dead:
            if self._dead:
                log.warning("rebuilding the coordination group of distributed saves after a "
                            "failed collective")
            main, join = _new_group(timeout_seconds()), _new_group(join_timeout_seconds())
            self._groups, self._key, self._dead = (main, join), key, False
        return self._groups

    def get(self) -> Any:
        """The group of the protocol (collective timeout)."""
        return self._current()[0]

    def join(self) -> Any:
        """The group of a save's first collective (join timeout)."""
        return self._current()[1]

    def mark_dead(self) -> None:
        """A collective failed: make new groups on next use (collectively, by every rank)."""
        self._dead = True


def _new_group(seconds: float) -> Any:
    """A gloo group of every rank whose operations time out after ``seconds``.

    Making it may wait longer, the collective plus the join timeout: after a failed
    save a late rank reaches the rebuild only once its own join timed out, and a rank
    whose ``new_group`` gave up would not match the others' groups again (torch names
    groups by a per-process counter)."""
    setter = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    if setter is None:  # a torch without it: one timeout for both
        return dist.new_group(backend="gloo", timeout=_dt.timedelta(seconds=seconds))
    wait = timeout_seconds() + join_timeout_seconds()
    group = dist.new_group(backend="gloo", timeout=_dt.timedelta(seconds=max(seconds, wait)))
    setter(_dt.timedelta(seconds=seconds), group)
    return group


_coordination = CoordinationGroup()


def coordination_group() -> Any:
    """This process's :class:`CoordinationGroup` for the current default group."""
    return _coordination.get()


def abandon() -> None:
    """This rank left a collective the others are in (they will time out): make new
    groups at the next save, as they will."""
    _coordination.mark_dead()


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
    try:
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, COORDINATOR),
                                   group=group)
    except RuntimeError:
        _coordination.mark_dead()
        raise
    return box[0]


def join(vote: Vote) -> list[Vote]:
    """The first collective of a save: every rank's vote, on every rank (all-gather on
    the join group). A rank that failed before it votes ``ok=False`` instead of raising,
    so the others learn it at once. Raises DistributedSaveError (phase ``"join"``) when
    not every rank joined within :func:`join_timeout_seconds`."""
    group = _coordination.join()
    votes: list = [None] * dist.get_world_size(group)
    try:
        dist.all_gather_object(votes, vote, group=group)
    except Exception as e:  # a rank is late, hung, died, or saves alone (no DTensors)
        _coordination.mark_dead()
        raise DistributedSaveError(
            f"not every rank started the distributed save within "
            f"{join_timeout_seconds():.0f}s (CKPTSTORE_DIST_JOIN_TIMEOUT): a rank died, hangs, "
            "is late, or did not call save() (a rank whose state holds no DTensors saves "
            "alone unless every rank passes distributed=True); nothing was written, the next "
            f"save makes a new coordination group ({type(e).__name__}: {str(e)[:500]})",
            ((None, "join", type(e).__name__, str(e)[:2000]),)) from e
    return votes


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
        _coordination.mark_dead()  # gloo cannot reuse the group: every rank rebuilds it
        if decision is not None and decision.committed:
            return decision  # the coordinator committed; only the broadcast failed
        raise DistributedSaveError(
            f"rank {rank}: a collective of the distributed save failed ({type(e).__name__}: "
            f"{e}); another rank died or did not answer within {timeout_seconds():.0f}s",
            ((rank, "collective", type(e).__name__, str(e)[:2000]),)) from e
    assert decision is not None
    return decision
