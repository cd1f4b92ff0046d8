"""What ``ckptstore ls`` shows: every step directory of a run, committed or not,
with the bytes it added and stored, its age and the steps whose files it reads."""
from __future__ import annotations

import time
from dataclasses import dataclass

from ckptstore import manifest as fmt
from ckptstore.errors import CheckpointNotFoundError
from ckptstore.runs.deps import depends_on
from ckptstore.runs.layout import parse_step
from ckptstore.storage import Storage
from ckptstore.storage.preflight import describe, root_file


@dataclass(frozen=True, slots=True)
class StepInfo:
    """One step directory as ``ls`` shows it."""

    step: int
    name: str
    committed: bool
    added_bytes: int  #: bytes stored in this directory (what this step added)
    stored_bytes: int  #: bytes the checkpoint reads, referenced files included
    logical_bytes: int
    ratio: float | None  #: stored / logical
    age_seconds: float | None
    problem: str | None = None
    #: other step directories whose files it reads (its incremental bases); empty: full
    depends_on: tuple[str, ...] = ()


def age_of(storage: Storage, name: str, now: float) -> float | None:
    try:
        return max(0.0, now - storage.mtime(name))
    except (OSError, ValueError, AttributeError, NotImplementedError):
        return None


def check_run(root: Storage, *, checkpoint_ok: bool = False, missing_ok: bool = False) -> None:
    """Raise CheckpointNotFoundError (with a hint) unless ``root`` is a directory that
    can hold steps: not a missing path, not a file; not one checkpoint either, unless
    ``checkpoint_ok`` (``gc`` and promotion take one checkpoint too). ``missing_ok``
    lets an empty prefix of an object store pass (it may hold incomplete uploads)."""
    if root.isdir(""):
        if checkpoint_ok or not root.exists(fmt.MANIFEST_NAME):
            return
        hint = (f"this is one checkpoint, not a run directory; look at it with `ckptstore inspect "
                f"{root.url}` or verify it with `ckptstore fsck {root.url}`")
    elif missing_ok and root_file(root) is None:
        return
    else:
        hint = describe(root) or "this is not a directory"
    raise CheckpointNotFoundError(f"no run directory at {root.url}: {hint}", hint)


def list_steps(root: Storage) -> list[StepInfo]:
    """Every step directory below ``root``, committed or not, by step."""
    now = time.time()
    out = []
    for entry in root.listdir():
        step = parse_step(entry)
        if step is None:
            continue
        d = root.child(entry)
        try:
            m = fmt.read_manifest(d)
        except FileNotFoundError:
            files = [f for f in d.listdir() if not d.isdir(f)]
            added = sum(_size(d, f) for f in files)
            age = min((a for a in (age_of(d, f, now) for f in files) if a is not None), default=None)
            out.append(StepInfo(step, entry, False, added, added, 0, None, age))
            continue
        except (OSError, ValueError) as e:
            out.append(StepInfo(step, entry, False, 0, 0, 0, None, None, f"{type(e).__name__}: {e}"))
            continue
        added = sum(f.size for f in m.files if f.base is None)
        stored = sum(f.size for f in m.files)
        logical = sum(t.nbytes for t in m.tensors)
        out.append(StepInfo(step, entry, True, added, stored, logical,
                            round(stored / logical, 4) if logical else None,
                            age_of(d, fmt.MANIFEST_NAME, now), depends_on=tuple(depends_on(m))))
    return sorted(out, key=lambda s: s.step)


def _size(d: Storage, name: str) -> int:
    try:
        return d.size(name)
    except (OSError, ValueError):
        return 0
