"""Opening and closing a Checkpointer's memory tier, alone or shared by the ranks of
one node.

A single-process Checkpointer claims its memory directory (:func:`memory.claim`). A
collective one keeps one memory tier per run on the node: rank 0 claims it (it owns
it, as it owns the run directory), and every other rank checks that it sees the very
directory rank 0 claimed (the same path, holding rank 0's owner record). A rank that
does not runs on another node: a memory tier spanning nodes is refused on every rank
with :class:`UnsupportedOperationError`, before anything is saved. The distributed
save then writes into the shared directory exactly as into a shared local disk.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptstore.errors import UnsupportedOperationError
from ckptstore.runs import memory as mem
from ckptstore.runs.agreement import Agreement
from ckptstore.runs.recovery import Attempt
from ckptstore.runs.replica import drop_all
from ckptstore.runs.retention import Policy
from ckptstore.runs.tiers import Tier, unpromoted

log = logging.getLogger("ckptstore.memory")


@dataclass(frozen=True, slots=True)
class MemoryTier:
    """A claimed memory tier: its directory and its :class:`Tier`."""

    path: Path
    tier: Tier


def open_memory(memory: Any, local_dir: Any, remote: str | None, keep: int,
                max_bytes: int | None, sync: Agreement) -> MemoryTier:
    """Claim the run's memory tier (collective: rank 0 claims it, every rank checks
    it sees the same directory; raises on every rank when one does not)."""
    mem.check_limits(keep, max_bytes)
    path = mem.memory_dir(memory, local_dir, remote)
    if not sync.collective:
        return MemoryTier(path, Tier("memory", mem.claim(path), Policy(keep, None, None)))

    def claim() -> tuple[str, str]:
        nonce = secrets.token_hex(8)
        mem.claim(path, nonce=nonce)
        return str(path), nonce

    where, nonce = sync.agree(claim, "claiming the memory tier")
    seen = where == str(path) and _owner_nonce(path) == nonce
    missing = [r for r, ok in enumerate(sync.exchange(seen)) if not ok]
    if missing:
        raise UnsupportedOperationError(
            f"rank(s) {missing} do not see rank 0's memory tier {where} (another node, or "
            f"another memory= or ${mem.MEMORY_ENV}): a memory tier shared by the ranks of "
            "several nodes is not supported yet; pass memory=False (the disk and object-store "
            "tiers work across nodes), or run the job on one node")
    root = mem.open_claimed(path)
    return MemoryTier(path, Tier("memory", root, Policy(keep, None, None)))


def _owner_nonce(path: Path) -> str | None:
    try:
        return json.loads((path / mem.OWNER_NAME).read_text()).get("nonce")
    except (OSError, ValueError, AttributeError):
        return None


def release_memory(m: MemoryTier, durable: Tier, peer: str | None) -> bool:
    """Remove the memory tier at the end of a run, unless it holds a step the
    durable tier's policy wants and it lacks (then it may hold the only copy: kept,
    and a warning). Drops the run's copies on the peer too. Returns whether it was
    removed."""
    left = unpromoted(m.tier, durable)
    if left:
        log.warning("memory tier %s kept: steps %s are not on %s", m.path, sorted(left),
                    durable.root.url)
        return False
    if peer is not None:  # the run ended cleanly: its peer copies are not needed
        drop_all(peer, m.path.name)
    mem.release(m.path)
    log.debug("memory tier %s removed (pid %d)", m.path, os.getpid())
    return True


def retire_damaged(m: MemoryTier, durable: Tier, attempts: Iterable[Attempt]) -> list[int]:
    """Drop the memory copies a load found damaged (CorruptCheckpointError: a hash or
    size that does not match), so later restarts do not try them again; only copies
    of steps the durable tier holds (a damaged only copy is kept for salvage).
    Returns the steps dropped."""
    bad = {a.step for a in attempts if a.tier == "memory" and a.damaged}
    out = []
    for step in sorted(bad & set(durable.committed())) if bad else []:
        try:
            mem.retire(m.tier.root, step)
            out.append(step)
            log.warning("memory copy of step %d failed verification: dropped from %s (%s holds "
                        "the step)", step, m.path, durable.root.url)
        except (OSError, ValueError) as e:
            log.warning("could not drop the damaged memory copy of step %d: %s", step, e)
    return out
