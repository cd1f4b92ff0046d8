"""The recovery order of ``Checkpointer.load``: try the copies in order, verified,
falling back past damage; record where the state came from and what each try cost.

Copies are ``(step, tier name)`` pairs, newest step first and, per step, in the
order of the tiers: own memory, peer, local disk, remote (see docs/tiers.md). A copy
that fails is reported with a :class:`CheckpointFallbackWarning` and the next one is
tried. Collective Checkpointers use a copy only if it loaded on every rank.
"""
from __future__ import annotations

import concurrent.futures as cf
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ckptstore.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    SchemaVersionError,
    StorageError,
)
from ckptstore.runs.agreement import Agreement, rebuild_error
from ckptstore.runs.layout import step_name
from ckptstore.runs.replica import fetch_into, peer_steps
from ckptstore.runs.tiers import Tier
from ckptstore.storage import Storage

log = logging.getLogger("ckptstore.checkpointer")

#: what a failed copy may raise and still be passed over (the next copy is tried)
FALLBACK_ERRORS = (CorruptCheckpointError, CheckpointNotFoundError, StorageError,
                   FileNotFoundError, ConnectionError, TimeoutError)


class CheckpointFallbackWarning(UserWarning):
    """A copy of a checkpoint failed verification; an older or other copy was used."""


@dataclass(frozen=True, slots=True)
class Attempt:
    """One copy tried by a load: the tier, the step, seconds spent, the outcome
    (``"ok"``, or ``"fallback: <why>"``), and whether the copy was found damaged (a
    :class:`CorruptCheckpointError` on some rank: a hash or size that does not match,
    not a missing or unreachable copy)."""

    tier: str
    step: int
    seconds: float
    outcome: str
    damaged: bool = False


@dataclass(frozen=True, slots=True)
class Recovered:
    """What a load returned and how it got there."""

    step: int
    tier: str
    value: Any
    attempts: tuple[Attempt, ...]


def recover(cands: list[tuple[int, str]], locate: Callable[[int, str], Storage],
            load_one: Callable[[Storage], Any], sync: Agreement, what: str,
            where: str) -> Recovered:
    """Load the first of ``cands`` that loads (on every rank). ``locate(step, tier)``
    gives the copy's directory (a peer copy is fetched into the memory tier there);
    ``load_one(directory)`` loads it verified. ``what`` and ``where`` name the request
    and the tiers in the error raised when no copy is intact."""
    problems: list[str] = []
    attempts: list[Attempt] = []
    for s, tname in cands:
        t0 = time.perf_counter()
        out: Any = None
        outcome: tuple[Any, ...] | None = None
        err: Exception | None = None
        url = f"{tname} step {s}"
        try:
            copy = locate(s, tname)
            url = copy.url
            out = load_one(copy)
        except SchemaVersionError as e:
            if not sync.collective:
                raise
            outcome, err = ("fatal", type(e).__name__, str(e)), e
        except FALLBACK_ERRORS as e:
            outcome = ("fallback", f"{type(e).__name__}: {e}", isinstance(e, CorruptCheckpointError))
        except Exception as e:
            if not sync.collective:
                raise
            outcome, err = ("fatal", type(e).__name__, str(e)), e
        seconds = time.perf_counter() - t0
        outcomes = sync.exchange(outcome)
        fatal = [(r, o) for r, o in enumerate(outcomes) if o and o[0] == "fatal"]
        if fatal:  # every rank raises: its own error, or the first rank's
            if err is not None:
                raise err
            r, (_, name, msg) = fatal[0]
            raise rebuild_error(name, f"rank {r} failed to load step {s}: {msg}", r, "load")
        bad = [(r, o[1]) for r, o in enumerate(outcomes) if o]
        if bad:
            why = "; ".join(msg if len(outcomes) == 1 else f"rank {r}: {msg}" for r, msg in bad)
            problems.append(f"{tname} step {s}: {why}")
            attempts.append(Attempt(tname, s, seconds, f"fallback: {why}",
                                    any(o[2] for o in outcomes if o)))
            if sync.coordinator:
                warn(f"{tname} copy of step {s} ({url}) is unusable: {why}; falling back")
            continue
        attempts.append(Attempt(tname, s, seconds, "ok"))
        log.info("loaded step %d from the %s tier in %.3f s", s, tname, seconds)
        return Recovered(s, tname, out, tuple(attempts))
    raise CheckpointNotFoundError(
        f"no intact committed checkpoint of {what} on {where}"
        + (": " + "; ".join(problems) if problems else ""))


@dataclass(frozen=True, slots=True)
class Copies:
    """A run's tiers in the recovery order, with the peer (its keeper's ``address``,
    the run's name there) after the own memory tier."""

    tiers: tuple[Tier, ...]  #: memory, local, remote (those the run has)
    peer: str | None = None
    run: str | None = None

    def names(self) -> list[str]:
        names = [t.name for t in self.tiers]
        return names[:1] + ["peer"] + names[1:] if self.peer is not None else names

    def committed(self) -> dict[str, list[int]]:
        """Each tier's committed steps (the peer's as its keeper lists them; none
        when it is unreachable). The tiers are asked in parallel: a restart pays for
        the slowest listing (an object store's, a peer's), not for their sum."""
        jobs: dict[str, Callable[[], list[int] | None]] = {t.name: t.committed for t in self.tiers}
        if self.peer is not None and self.run is not None:
            peer, run = self.peer, self.run
            jobs["peer"] = lambda: peer_steps(peer, run)
        if len(jobs) == 1:
            return {k: list(fn() or ()) for k, fn in jobs.items()}
        with cf.ThreadPoolExecutor(len(jobs), thread_name_prefix="ckptstore-list") as pool:
            futures = {k: pool.submit(fn) for k, fn in jobs.items()}
        got = {k: f.result() for k, f in futures.items()}  # a tier's error is raised here
        return {k: v for k, v in got.items() if v is not None}

    def locate(self, step: int, tier: str) -> Storage:
        """The directory of ``tier``'s copy of ``step``; a peer copy is fetched into
        the memory tier first (replacing a memory copy that failed to load)."""
        if tier != "peer":
            return next(t for t in self.tiers if t.name == tier).root.child(step_name(step))
        memory = next(t for t in self.tiers if t.name == "memory")
        assert self.peer is not None and self.run is not None
        return fetch_into(self.peer, self.run, step, memory.root)


def fetch_shared(copies: Copies, step: int, sync: Agreement) -> Storage:
    """The peer's copy of ``step``, fetched (and verified) into the memory tier. In a
    collective run the node's memory tier is shared: rank 0 fetches, every rank then
    loads from there; a failed fetch falls back on every rank."""
    if not sync.collective:
        return copies.locate(step, "peer")

    def fetch() -> tuple[str, ...]:
        try:
            copies.locate(step, "peer")
            return ("ok",)
        except FALLBACK_ERRORS as e:
            return ("fallback", type(e).__name__, str(e))

    got = sync.agree(fetch, f"fetching step {step} from the peer")
    if got[0] != "ok":
        raise CheckpointNotFoundError(f"rank 0 could not fetch step {step} from the peer: "
                                      f"{got[1]}: {got[2]}")
    memory = next(t for t in copies.tiers if t.name == "memory")
    return memory.root.child(step_name(step))


def order(per_tier: dict[str, list[int]], tiers: list[str], step: "int | str"
          ) -> list[tuple[int, str]]:
    """(step, tier) pairs to try for ``step`` (or ``"latest"``): newest step first,
    per step in the order of ``tiers``; ``per_tier`` holds each tier's committed steps."""
    if step == "latest":
        steps = sorted({s for t in tiers for s in per_tier.get(t, ())}, reverse=True)
        return [(s, t) for s in steps for t in tiers if s in per_tier.get(t, ())]
    if not isinstance(step, int) or isinstance(step, bool):
        raise ValueError(f"step must be an int or 'latest', not {step!r}")
    # a step missing from memory or the peer is ordinary (evicted, not pushed): no warning
    return [(step, t) for t in tiers if t not in ("memory", "peer") or step in per_tier.get(t, ())]


def warn(message: str) -> None:
    """Log ``message`` and issue it as a :class:`CheckpointFallbackWarning`."""
    log.warning("%s", message)
    warnings.warn(message, CheckpointFallbackWarning, stacklevel=4)
