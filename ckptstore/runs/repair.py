"""Repair a local checkpoint from the remote tier's copy of the same step.

One damaged chunk of an incremental run's full save makes every later step that
reads it unloadable. When the remote tier holds an intact copy of the damaged file
(promotion uploads whole, verified files: each promoted step is complete on the
remote alone), the local file is replaced by it:

1. the local step is verified (every file present at its size, headers, every chunk
   hash) and each damaged file is traced to the directory that holds it (the step
   itself or an older step it depends on, :mod:`ckptstore.runs.deps`);
2. the remote copy of that file is looked up under the same step, then under the
   step that holds it locally, and read whole;
3. the bytes are checked against the size and header hash the step's manifest
   records and against every chunk hash that any committed local manifest reading
   the file records (the holder's own among them, while it is committed); bytes that
   fail are never written;
4. the verified bytes replace the local file through the one atomic write path
   (temp file, fsync, rename, fsync directory).

Damage this cannot fix (a damaged manifest, no intact remote copy) is reported and
left as it is: loads then fall back as before. This module imports no torch.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ckptstore import manifest as fmt
from ckptstore.commit.atomic import atomic_write
from ckptstore.errors import CheckpointNotFoundError, CorruptCheckpointError, UnsafeCheckpointError
from ckptstore.runs.deps import holder
from ckptstore.runs.layout import committed_steps, step_name
from ckptstore.storage import Storage
from ckptstore.verify.checks import Damage, Verifier, bytes_damage

log = logging.getLogger("ckptstore.repair")
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class Repaired:
    """One local file replaced by a verified remote copy."""

    dir: str  #: the local step directory that holds the file
    file: str
    source: str  #: URL of the remote copy


@dataclass(frozen=True, slots=True)
class RepairReport:
    """What a repair of one step found and did."""

    name: str
    damaged: tuple[str, ...]  #: every problem found, as sentences
    repaired: tuple[Repaired, ...]
    unrepaired: tuple[str, ...]  #: problems left (no intact remote copy, ...)

    @property
    def ok(self) -> bool:
        """The step is intact now (or was already)."""
        return not self.unrepaired


def repair_step(local_root: Storage, remote_root: Storage, name: str) -> RepairReport:
    """Verify step ``name`` below run directory ``local_root`` and replace each of
    its damaged or missing files (its own, or an older step's it depends on) by an
    intact copy from run directory ``remote_root``. Raises CheckpointNotFoundError
    when the local step is not committed."""
    where = local_root.child(name)
    try:
        m = fmt.read_manifest(where)
    except CheckpointNotFoundError:
        raise
    except (OSError, ValueError) as e:  # the remote copy of the whole step serves instead
        problem = f"manifest is unreadable ({type(e).__name__}: {e}); load the remote copy"
        return RepairReport(name, (problem,), (), (problem,))
    try:
        damage = _damage(where, m)
    except UnsafeCheckpointError as e:
        return RepairReport(name, (str(e),), (), (str(e),))
    if not damage:
        return RepairReport(name, (), (), ())
    found = tuple(d.sentence(where.url) for d in damage)
    if any(d.file is None or d.file == fmt.MANIFEST_NAME for d in damage):
        return RepairReport(name, found, (), found)
    repaired: list[Repaired] = []
    unrepaired: list[str] = []
    for file in sorted({d.file for d in damage if d.file is not None}):
        done = _repair_file(local_root, remote_root, name, m, file)
        if isinstance(done, Repaired):
            repaired.append(done)
        else:
            unrepaired.append(done)
    return RepairReport(name, found, tuple(repaired), tuple(unrepaired))


def repairing(load: F, local_root: Storage | None, remote_root: Storage | None) -> F:
    """``load`` (``load(where, **kwargs)``), such that a copy of a step below
    ``local_root`` that fails with damaged or missing files is repaired from
    ``remote_root`` and loaded again. Without both roots: ``load`` itself. When
    nothing could be repaired the first error is raised (the caller falls back)."""
    if local_root is None or remote_root is None:
        return load
    local, remote = local_root, remote_root

    def load_repaired(where: Storage, *args: Any, **kwargs: Any) -> Any:
        try:
            return load(where, *args, **kwargs)
        except (CorruptCheckpointError, FileNotFoundError) as e:
            name = where.url.rstrip("/").rpartition("/")[2]
            if (isinstance(e, (CheckpointNotFoundError, UnsafeCheckpointError))
                    or local.child(name).url != where.url):
                raise
            try:
                report = repair_step(local, remote, name)
            except (OSError, ValueError) as r:  # e.g. the remote is unreachable
                log.warning("could not repair %s from %s: %s: %s", where.url, remote.url,
                            type(r).__name__, r)
                raise e from None
            if report.unrepaired:
                log.warning("could not repair %s from %s: %s", where.url, remote.url,
                            "; ".join(report.unrepaired))
            if not report.repaired:
                raise
        return load(where, *args, **kwargs)

    return load_repaired  # type: ignore[return-value]


def _damage(where: Storage, m: fmt.Manifest) -> list[Damage]:
    v = Verifier(where, m)
    return [*v.files(), *v.chunks()]


def _chunks_of(manifests: list[fmt.Manifest], file: str) -> list[tuple[str, int, fmt.ChunkRecord]]:
    """Every distinct chunk of ``file`` that any of ``manifests`` records."""
    seen: set[tuple[int, int, str]] = set()
    out = []
    for m in manifests:
        for t in m.tensors:
            for i, c in enumerate(t.chunks):
                if c.file == file and (c.offset, c.length, c.hash) not in seen:
                    seen.add((c.offset, c.length, c.hash))
                    out.append((t.name, i, c))
    return out


def _readers(local_root: Storage, home: str, file: str, *, skip: str) -> list[fmt.Manifest]:
    """The manifests of the committed local steps (but ``skip``) that read ``file``
    held by step directory ``home`` (the holder's own, if committed, among them)."""
    out = []
    for s in committed_steps(local_root):
        d = step_name(s)
        if d == skip:
            continue
        try:
            m = fmt.read_manifest(local_root.child(d))
        except (OSError, ValueError):
            continue  # damaged: it is no checkpoint to protect
        if _record(m, file) is not None and holder(m, d, file) == home:
            out.append(m)
    return out


def _record(m: fmt.Manifest, file: str) -> fmt.FileRecord | None:
    return next((f for f in m.files if f.name == file), None)


def _repair_file(local_root: Storage, remote_root: Storage, name: str, m: fmt.Manifest,
                 file: str) -> "Repaired | str":
    """Replace local ``file`` of step ``name`` by a verified remote copy; what was
    done, or why it could not be."""
    rec = _record(m, file)
    if rec is None:
        return f"{file} is not a file of {name}"
    home = holder(m, name, file)
    # every chunk of the file that a committed local step reads: a copy that would
    # damage any of them is refused, not only one that damages this step
    chunks = _chunks_of([m, *_readers(local_root, home, file, skip=name)], file)
    tried = []
    for src in _sources(remote_root, (name, home), file, rec):
        try:
            data = src.read(file)
        except (OSError, ValueError) as e:
            tried.append(f"{src.url}/{file}: {type(e).__name__}: {e}")
            continue
        bad = [str(d) for d in bytes_damage(rec, data, chunks)]
        if bad:  # never written: repair only ever writes verified bytes
            tried.append(f"{src.url}/{file}: {bad[0]}")
            continue
        dst = local_root.child(home)
        dst.makedirs()
        atomic_write(dst, file, [data])
        log.warning("repaired %s/%s (read by %s) from the verified remote copy %s/%s",
                    dst.url, file, name, src.url, file)
        return Repaired(home, file, f"{src.url}/{file}")
    where = f"file {file} of {home}" + ("" if home == name else f" (read by {name})")
    return (f"{where}: no intact copy on {remote_root.url}"
            + (" (" + "; ".join(tried) + ")" if tried else ""))


def _sources(remote_root: Storage, steps: tuple[str, ...], file: str,
             rec: fmt.FileRecord) -> list[Storage]:
    """Remote directories holding ``file`` as committed remote copies of ``steps``
    record it (same size and header hash)."""
    out: list[Storage] = []
    urls: set[str] = set()
    for step in dict.fromkeys(steps):
        try:
            rm = fmt.read_manifest(remote_root.child(step))
        except (OSError, ValueError):
            continue
        r = _record(rm, file)
        if r is None or r.size != rec.size or r.header_hash != rec.header_hash:
            continue
        d = remote_root.child(r.base or step)
        if d.url not in urls:
            urls.add(d.url)
            out.append(d)
    return out
