"""``ckptstore ls``, ``gc`` and ``promote``: runs of step checkpoints on any tier.

``gc`` removes only what ckptstore creates and a crash can leave behind, once it is
older than a grace period: temp files (``.tmp-*``), data files of step directories
that never committed (files still referenced by a committed step stay), and on S3
incomplete multipart uploads below the prefix. Committed checkpoints are never
touched, nor files whose names ckptstore does not write.
"""
from __future__ import annotations

import argparse
import re
import time
from dataclasses import asdict, dataclass

from ckptstore import manifest as fmt
from ckptstore.cli.main import _options, _out, command, progress_bar
from ckptstore.commit.atomic import is_temp_name
from ckptstore.runs.retention import parse_step, referenced_files
from ckptstore.storage import Storage, open_storage
from ckptstore.storage.capabilities import MultipartGC

#: names of files a save writes into a checkpoint directory
DATA_RE = re.compile(r"^(shard-\d{5}-[0-9a-f]+\.(chunks|safetensors)|\.tmp-.*)$")
DEFAULT_GRACE = 3600.0


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


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help="fsspec storage option (repeatable)")


def _age(storage: Storage, name: str, now: float) -> float | None:
    try:
        return max(0.0, now - storage.mtime(name))
    except (OSError, ValueError, AttributeError, NotImplementedError):
        return None


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
            age = min((a for a in (_age(d, f, now) for f in files) if a is not None), default=None)
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
                            _age(d, fmt.MANIFEST_NAME, now)))
    return sorted(out, key=lambda s: s.step)


def _size(d: Storage, name: str) -> int:
    try:
        return d.size(name)
    except (OSError, ValueError):
        return 0


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _ls_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", help="run directory or URL (holds step-NNNNNNNNNNNN directories)")
    _common(p)


@command("ls", "list the steps of a run: committed or not, bytes added, ratio, age")
def _ls(args) -> int:
    root = open_storage(args.url, _options(args))
    steps = list_steps(root)
    lines = [f"{'step':>12}  {'state':<10} {'added':>10} {'stored':>10} {'ratio':>6}  age"]
    for s in steps:
        state = "committed" if s.committed else ("damaged" if s.problem else "incomplete")
        age = "-" if s.age_seconds is None else f"{s.age_seconds:.0f}s"
        ratio = "-" if s.ratio is None else f"{s.ratio:.3f}"
        lines.append(f"{s.step:>12}  {state:<10} {_human(s.added_bytes):>10} "
                     f"{_human(s.stored_bytes):>10} {ratio:>6}  {age}")
    scheme, sep, _ = root.url.partition("://")
    tier = "local" if root.capabilities.local_path else (scheme if sep else "remote")
    lines.insert(0, f"{root.url} ({tier})")
    _out(args, {"url": root.url, "tier": tier, "steps": [asdict(s) for s in steps]},
         "\n".join(lines))
    return 0


# -- gc ---------------------------------------------------------------------

def gc(root: Storage, *, grace: float = DEFAULT_GRACE, dry_run: bool = False) -> list[str]:
    """Remove leftovers below run directory ``root`` older than ``grace`` seconds;
    returns what was (or, with ``dry_run``, would be) removed."""
    now = time.time()
    manifests: dict[str, fmt.Manifest] = {}
    dirs = [e for e in root.listdir() if parse_step(e) is not None]
    for e in dirs:
        try:
            manifests[e] = fmt.read_manifest(root.child(e))
        except FileNotFoundError:
            continue
        except (OSError, ValueError):
            manifests[e] = None  # type: ignore[assignment]  # damaged: leave it alone
    refs = referenced_files(root, {k: v for k, v in manifests.items() if v is not None})
    removed: list[str] = []
    for e in dirs:
        d = root.child(e)
        committed = e in manifests
        for f in d.listdir():
            if not DATA_RE.match(f) or (e, f) in refs or (committed and not is_temp_name(f)):
                continue
            age = _age(d, f, now)
            if age is None or age < grace:
                continue
            removed.append(f"{d.url}/{f}")
            if not dry_run:
                d.remove(f)
        if not committed and not dry_run and not d.listdir():
            root.rmtree(e)
    removed += _gc_multipart(root, now, grace, dry_run)
    return removed


def _gc_multipart(root: Storage, now: float, grace: float, dry_run: bool) -> list[str]:
    """Abort incomplete (S3 multipart) uploads below ``root`` older than ``grace``."""
    if not isinstance(root, MultipartGC):
        return []
    out = []
    for up in root.incomplete_uploads():
        if up.started is not None and now - up.started < grace:
            continue
        out.append(f"{up.url} (incomplete upload {up.upload_id})")
        if not dry_run:
            root.abort_upload(up)
    return out


def _gc_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", help="run directory or URL")
    p.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    p.add_argument("--grace", type=float, default=DEFAULT_GRACE,
                   help=f"leave anything younger than this many seconds (default {DEFAULT_GRACE:.0f})")
    _common(p)


@command("gc", "remove temp files, uncommitted steps and incomplete uploads of a run")
def _gc(args) -> int:
    root = open_storage(args.url, _options(args))
    removed = gc(root, grace=args.grace, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    text = "\n".join(f"{verb} {r}" for r in removed) or "nothing to remove"
    _out(args, {"url": root.url, "dry_run": args.dry_run, "removed": removed}, text)
    return 0


# -- promote ----------------------------------------------------------------

def _promote_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="run directory/URL, or one step directory/URL")
    p.add_argument("dst", help="run directory/URL to copy committed steps into")
    p.add_argument("--dst-option", action="append", default=[], metavar="KEY=VALUE",
                   help="fsspec storage option for DST (repeatable)")
    _common(p)


@command("promote", "copy committed checkpoints to another tier (data first, manifest last)")
def _promote(args) -> int:
    from ckptstore.runs.promote import promote_step

    src = open_storage(args.src, _options(args))
    dst = open_storage(args.dst, _options(argparse.Namespace(storage_option=args.dst_option))
                       or _options(args))
    if src.exists(fmt.MANIFEST_NAME):  # one checkpoint: SRC's own name is the step name
        name = src.url.rstrip("/").rpartition("/")[2]
        names, src = [name], _parent(src, name)
    else:
        names = [s.name for s in list_steps(src) if s.committed]
    update, close = progress_bar(len(names), "promote")
    results = []
    try:
        for n in names:
            r = promote_step(src, dst, n)
            results.append(asdict(r))
            update(1)
    finally:
        close()
    text = "\n".join(f"{r['name']}: {'already there' if r['already'] else 'promoted'}, "
                     f"{r['uploaded_files']} files, {_human(r['uploaded_bytes'])} uploaded"
                     for r in results) or "no committed checkpoints to promote"
    _out(args, {"src": src.url, "dst": dst.url, "promoted": results}, text)
    return 0


def _parent(s: Storage, name: str) -> Storage:
    """The run directory holding checkpoint ``s`` (named ``name``)."""
    return s.parent()


_ls.arguments = _ls_args  # type: ignore[attr-defined]
_gc.arguments = _gc_args  # type: ignore[attr-defined]
_promote.arguments = _promote_args  # type: ignore[attr-defined]
