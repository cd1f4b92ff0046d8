"""Tiers of a run: where its steps live, what each keeps, and one retention round.

The :class:`~ckptstore.api.checkpointer.Checkpointer` drives these; they read every
manifest through :func:`ckptstore.manifest.read_manifest` (migrations included) and
verify through :mod:`ckptstore.verify.checks`. See docs/tiers.md.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from ckptstore import manifest as fmt
from ckptstore.errors import CheckpointExistsError, CorruptCheckpointError, SchemaVersionError
from ckptstore.runs.gc import gc
from ckptstore.runs.layout import committed_steps, read_step, step_name
from ckptstore.runs.repair import repairing as _repairing
from ckptstore.runs.retention import Policy, drop_steps, referenced_files, select_keep
from ckptstore.storage import Storage
from ckptstore.storage.preflight import check_writable
from ckptstore.verify.checks import check_quick
from ckptstore.verify.fsck import fsck

log = logging.getLogger("ckptstore.checkpointer")
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class Tier:
    """One place checkpoints live, and what it keeps."""

    name: str  # "local" | "remote"
    root: Storage
    policy: Policy

    def committed(self) -> list[int]:
        return committed_steps(self.root)

    def metrics(self, step: int) -> dict | None:
        """The metrics stored with ``step`` (None unless the policy keeps the best)."""
        if self.policy.keep_best is None:
            return None
        try:
            m = read_step(self.root, step, catalog=True)
        except (OSError, ValueError):
            return None
        meta = m.metadata if isinstance(m.metadata, dict) else {}
        return meta.get("metrics") if isinstance(meta.get("metrics"), dict) else None


def step_metadata(tiers: Iterable[Tier], step: int) -> dict | None:
    """The metadata stored with ``step`` on the first tier that has it readable."""
    for tier in tiers:
        try:
            return read_step(tier.root, step, catalog=True).metadata
        except (OSError, ValueError):
            continue
    return None


def unpromoted(local: Tier, remote: Tier) -> set[int]:
    """Local steps the remote policy wants that are not committed remotely."""
    on_local, on_remote = local.committed(), remote.committed()
    p = remote.policy
    only_every = bool(p.keep_every) and p.keep_last is None and p.keep_best is None
    every = p.keep_every or 1
    cands = {s: local.metrics(s) for s in on_local if not only_every or s % every == 0}
    cands.update({s: remote.metrics(s) for s in on_remote})
    return select_keep(cands, p) - set(on_remote)


def retain(tier: Tier, protected: Iterable[int] = frozenset()) -> None:
    """One retention round on ``tier``: keep what its policy and ``protected`` name,
    drop the rest (skipped while the newest step fails the quick check, or while a
    kept step is unreadable)."""
    committed = tier.committed()
    if not committed or tier.policy.keeps_all:
        return
    newest = max(committed)
    problem = check_quick(tier.root.child(step_name(newest)))
    if problem is not None:  # the newest may be all there is: delete nothing
        log.warning("retention on %s skipped: newest step %d fails verification: %s",
                    tier.root.url, newest, problem)
        return
    keep = select_keep({s: tier.metrics(s) for s in committed}, tier.policy, protected)
    drop = sorted(set(committed) - keep)
    if not drop:
        return
    manifests = {}
    for s in keep:
        try:
            manifests[step_name(s)] = read_step(tier.root, s)
        except (OSError, ValueError) as e:  # unreadable: keep it, and all it may need
            log.warning("retention on %s skipped: step %d unreadable: %s", tier.root.url, s, e)
            return
    for s in drop:  # never delete what this version cannot read
        try:
            read_step(tier.root, s, catalog=True)
        except SchemaVersionError as e:
            log.warning("retention on %s skipped: step %d was written by a newer ckptstore "
                        "and is kept (%s)", tier.root.url, s, e)
            return
        except (OSError, ValueError):
            pass  # damaged: dropping it loses nothing
    refs = referenced_files(tier.root, manifests)
    drop_steps(tier.root, [step_name(s) for s in drop], refs)
    # files that only dropped steps referenced, left in older step directories by
    # earlier rounds: reclaimed once older than gc's grace period (which spares a
    # save in progress)
    try:
        removed = gc(tier.root)
    except (OSError, ValueError) as e:
        log.warning("retention on %s could not reclaim unreferenced files: %s", tier.root.url, e)
    else:
        if removed:
            log.info("retention on %s reclaimed %d unreferenced files", tier.root.url, len(removed))


def repairing(load: F, local: Tier | None, remote: Tier | None) -> F:
    """``load`` that repairs a damaged local copy from the remote tier and loads it
    again (:mod:`ckptstore.runs.repair`); ``load`` itself without both tiers."""
    return _repairing(load, None if local is None else local.root,
                      None if remote is None else remote.root)


def prepare_step(root: Storage, step: int) -> None:
    """Before a Checkpointer saves ``step`` below ``root``: refuse a destination that
    cannot be written (DestinationNotWritableError, before anything is staged), then
    :func:`retire_damaged`."""
    check_writable(root)
    retire_damaged(root, step)


def retire_damaged(root: Storage, step: int) -> None:
    """A run that fell back past a damaged step saves that step again: retire the
    damaged copy's manifest (its files go to gc) so the new save can commit. An
    intact committed copy is never replaced (CheckpointExistsError)."""
    where = root.child(step_name(step))
    if not where.exists(fmt.MANIFEST_NAME):
        return
    try:
        report = fsck(where)
        problem = None if report.ok else "; ".join(str(d) for d in report.damage[:5])
    except SchemaVersionError as e:  # newer, not damaged: never retired
        raise CheckpointExistsError(
            f"step {step} at {where.url} was written by a newer ckptstore and is kept ({e}); "
            "upgrade ckptstore, or save another step") from None
    except (CorruptCheckpointError, OSError, ValueError) as e:
        problem = f"{type(e).__name__}: {e}"
    if problem is None:
        raise CheckpointExistsError(
            f"step {step} is already committed and intact at {where.url}; a Checkpointer "
            "never replaces an intact checkpoint: delete it first or save another step")
    log.warning("step %d at %s is damaged (%s); retiring it so it can be saved again",
                step, where.url, problem)
    where.remove(fmt.MANIFEST_NAME)
    if where.capabilities.fsync:
        where.fsync_dir()
