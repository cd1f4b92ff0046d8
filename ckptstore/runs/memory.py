"""The memory tier: a run directory in node-local tmpfs that outlives the process.

Each memory step is an ordinary checkpoint (same format, hashes, manifest-last
commit). The directory is named after the run (its absolute local directory, else
its remote URL), so a restarted trainer with the same arguments finds it, and holds
an owner file (pid and process start time) so that ``ckptstore gc --memory`` can tell
a crashed run's tier from a live one. Torch-free (the CLI imports it).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from ckptstore.commit.atomic import atomic_write
from ckptstore.errors import DestinationNotWritableError
from ckptstore.runs.layout import committed_steps, parse_step, step_name
from ckptstore.runs.retention import drop_steps, referenced_files
from ckptstore.storage import Storage, open_storage

log = logging.getLogger("ckptstore.memory")

MEMORY_ENV = "CKPTSTORE_MEMORY_DIR"  #: parent directory of every run's memory tier
OWNER_NAME = "owner.json"


def memory_parent() -> Path:
    """Where memory tiers live: ``$CKPTSTORE_MEMORY_DIR``, else ``/dev/shm/ckptstore-<uid>``."""
    env = os.environ.get(MEMORY_ENV)
    return Path(env) if env else Path("/dev/shm") / f"ckptstore-{os.getuid()}"


def run_key(local_dir: "str | os.PathLike | None", remote: str | None) -> str:
    """A stable directory name for a run: its last path component (readable) and a
    hash of the absolute local directory, else of the remote URL."""
    what = os.path.abspath(os.fspath(local_dir)) if local_dir is not None else str(remote)
    tail = re.sub(r"[^A-Za-z0-9_-]+", "_", what.rstrip("/").rpartition("/")[2])[:40] or "run"
    return f"{tail}-{hashlib.sha256(what.encode()).hexdigest()[:16]}"


def memory_dir(memory: "bool | str | os.PathLike", local_dir: "str | os.PathLike | None",
               remote: str | None) -> Path:
    """The run's memory tier: a given path, or (``memory=True``) the default one."""
    if memory is True:
        return memory_parent() / run_key(local_dir, remote)
    return Path(os.fspath(memory)).absolute()  # type: ignore[arg-type]


def check_limits(keep: int, max_bytes: int | None) -> None:
    """Refuse a ``memory_keep`` / ``memory_bytes`` that make no sense (ValueError)."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"memory_keep must be a positive integer, not {keep!r}")
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int)
                                  or max_bytes < 0):
        raise ValueError(f"memory_bytes must be None or a number of bytes >= 0, not {max_bytes!r}")


# -- ownership ----------------------------------------------------------------


def process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]  # field 22: starttime


def owner_alive(root: Path) -> bool | None:
    """Whether the process that owns memory tier ``root`` still runs (pid and start
    time both match); None when there is no readable owner file."""
    try:
        owner = json.loads((root / OWNER_NAME).read_text())
        pid, start = int(owner["pid"]), str(owner["start"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return process_start(pid) == start


def claim(root: Path, nonce: str | None = None) -> Storage:
    """Make ``root`` this process's memory tier: create it, refuse one a live process
    owns, write the owner file (with ``nonce``, when given: the ranks of a collective
    run check they see it), and remove a crashed run's uncommitted leftovers."""
    root.mkdir(parents=True, exist_ok=True)
    alive = owner_alive(root)
    mine = {**_owner_record(), **({"nonce": nonce} if nonce is not None else {})}
    if alive and json.loads((root / OWNER_NAME).read_text()).get("pid") != os.getpid():
        raise DestinationNotWritableError(
            f"the memory tier {root} is in use by a live process ({(root / OWNER_NAME).read_text()}); "
            "stop that run, or give this Checkpointer another memory= path")
    storage = open_storage(str(root))
    atomic_write(storage, OWNER_NAME, [json.dumps(mine).encode()])
    for entry in [] if alive else _leftovers(storage):  # a step killed mid-commit
        log.info("removing the uncommitted memory step %s left by an earlier run", entry)
        storage.rmtree(entry)
    return storage


def open_claimed(root: Path) -> Storage:
    """The memory tier at ``root`` that another process of this run claimed."""
    return open_storage(str(root))


def release(root: Path) -> None:
    """Remove the memory tier (a run that ended cleanly leaves nothing behind)."""
    shutil.rmtree(root, ignore_errors=True)


def _leftovers(root: Storage) -> list[str]:
    """Uncommitted step directories below ``root`` that no committed step reads
    (none when a committed manifest cannot be read: what it reads is unknown)."""
    from ckptstore import manifest as fmt

    committed = committed_steps(root)
    try:
        refs = {d for d, _ in referenced_files(root, {
            step_name(s): fmt.read_manifest(root.child(step_name(s))) for s in committed})}
    except (OSError, ValueError):
        return []
    return [e for e in root.listdir() if parse_step(e) is not None
            and parse_step(e) not in committed and e not in refs]


def _owner_record() -> dict:
    return {"pid": os.getpid(), "start": process_start(os.getpid())}


# -- accounting and eviction --------------------------------------------------


def step_bytes(root: Storage, step: int) -> int:
    """Bytes in ``step``'s directory (its own files; files it references elsewhere
    are counted where they are)."""
    d = root.child(step_name(step))
    return sum(d.size(f) for f in d.listdir() if not d.isdir(f))


def tier_bytes(root: Path) -> int:
    """Bytes held by a memory tier (every file below it)."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def select_evictions(sizes: dict[int, int], keep: int, max_bytes: int | None,
                     pending: set[int], busy: frozenset[int] = frozenset()) -> list[int]:
    """The committed memory steps (``sizes``: step -> bytes) to evict, oldest first:
    all but the newest ``keep``, then the oldest while the rest exceeds ``max_bytes``.
    Never the newest step, one the next tier wants but does not hold yet (``pending``:
    it would be the only copy), or one in ``busy`` (being pushed to the peer). A step
    the next tier's retention dropped (or never wants) is evicted like any other."""
    if not sizes:
        return []
    order = sorted(sizes, reverse=True)
    kept = order[:max(1, keep)]
    total = sum(sizes[s] for s in kept)
    while max_bytes is not None and total > max_bytes and len(kept) > 1:
        total -= sizes[kept.pop()]
    newest = order[0]
    return sorted(s for s in sizes if s not in kept and s != newest and s not in pending
                  and s not in busy)


def evict(root: Storage, keep: int, max_bytes: int | None, pending: set[int],
          busy: frozenset[int] = frozenset()) -> list[int]:
    """One eviction round on memory tier ``root`` (after a newer step committed
    there); returns the evicted steps. Manifests go first, then files no kept step
    references (crash-safe, as retention)."""
    steps = committed_steps(root)
    sizes = {s: step_bytes(root, s) for s in steps}
    drop = select_evictions(sizes, keep, max_bytes, pending, busy)
    kept = [s for s in steps if s not in drop]
    if max_bytes is not None and sum(sizes[s] for s in kept) > max_bytes:
        log.warning("memory tier %s holds %d bytes, over its cap of %d: the steps kept are "
                    "newest or not yet on the next tier", root.url, sum(sizes[s] for s in kept),
                    max_bytes)
    if not drop:
        return []
    _drop(root, drop, kept)
    log.info("memory tier %s: evicted steps %s", root.url, drop)
    return drop


def retire(root: Storage, step: int) -> None:
    """Drop memory step ``step`` (a copy that failed verification): its manifest first,
    then its files that no other committed memory step reads."""
    _drop(root, [step], [s for s in committed_steps(root) if s != step])


def _drop(root: Storage, drop: list[int], kept: list[int]) -> None:
    """Drop memory steps ``drop`` (manifests first, then files no step of ``kept``
    reads, as retention); a dropped step left without files leaves no directory."""
    from ckptstore import manifest as fmt

    manifests = {step_name(s): fmt.read_manifest(root.child(step_name(s))) for s in kept}
    drop_steps(root, [step_name(s) for s in drop], referenced_files(root, manifests))
    for s in drop:
        if root.isdir(step_name(s)) and not root.child(step_name(s)).listdir():
            root.rmtree(step_name(s))


# -- gc of memory tiers left by crashed runs ---------------------------------


@dataclass(frozen=True, slots=True)
class MemoryTierInfo:
    """One memory tier below the memory parent directory."""

    path: str
    owner_pid: int | None
    alive: bool  #: its owner process still runs
    bytes: int
    steps: tuple[int, ...]


def memory_tiers(parent: Path | None = None) -> list[MemoryTierInfo]:
    """Every memory tier below ``parent`` (default :func:`memory_parent`)."""
    parent = parent or memory_parent()
    out = []
    for d in sorted(parent.iterdir()) if parent.is_dir() else []:
        if not d.is_dir() or not (d / OWNER_NAME).exists():
            continue  # not ours: never touched
        try:
            pid: int | None = int(json.loads((d / OWNER_NAME).read_text())["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            pid = None
        steps = tuple(committed_steps(open_storage(str(d))))
        out.append(MemoryTierInfo(str(d), pid, bool(owner_alive(d)), tier_bytes(d), steps))
    return out


def gc_memory(parent: Path | None = None, *, dry_run: bool = False) -> list[MemoryTierInfo]:
    """Remove the memory tiers whose owner process is dead; returns them."""
    dead = [t for t in memory_tiers(parent) if not t.alive]
    if not dry_run:
        for t in dead:
            log.info("removing memory tier %s (owner %s is gone, %d bytes)", t.path, t.owner_pid,
                     t.bytes)
            release(Path(t.path))
    return dead
