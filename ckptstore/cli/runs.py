"""``ckptstore ls``, ``gc`` and ``promote``: runs of step checkpoints on any tier.

Arguments and output only; the work is in :mod:`ckptstore.runs` (``listing``,
``gc``, ``promote``).
"""
from __future__ import annotations

import argparse
from dataclasses import asdict

from ckptstore import manifest as fmt
from ckptstore.cli.base import command, common_options, emit, progress_bar, storage_options
from ckptstore.runs.gc import DEFAULT_GRACE, gc
from ckptstore.runs.listing import list_steps
from ckptstore.storage import Storage, open_storage


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _ls_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", help="run directory or URL (holds step-NNNNNNNNNNNN directories)")
    common_options(p)


@command("ls", "list the steps of a run: committed or not, bytes added, ratio, age",
         _ls_args)
def _ls(args) -> int:
    root = open_storage(args.url, storage_options(args))
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
    emit(args, {"url": root.url, "tier": tier, "steps": [asdict(s) for s in steps]},
         "\n".join(lines))
    return 0


# -- gc ---------------------------------------------------------------------


def _gc_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", help="run directory or URL")
    p.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    p.add_argument("--grace", type=float, default=DEFAULT_GRACE,
                   help=f"leave anything younger than this many seconds (default {DEFAULT_GRACE:.0f})")
    common_options(p)


@command("gc", "remove temp files, unreferenced shards and incomplete uploads of a run",
         _gc_args)
def _gc(args) -> int:
    root = open_storage(args.url, storage_options(args))
    removed = gc(root, grace=args.grace, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    text = "\n".join(f"{verb} {r}" for r in removed) or "nothing to remove"
    emit(args, {"url": root.url, "dry_run": args.dry_run, "removed": removed}, text)
    return 0


# -- promote ----------------------------------------------------------------


def _promote_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="run directory/URL, or one step directory/URL")
    p.add_argument("dst", help="run directory/URL to copy committed steps into")
    p.add_argument("--dst-option", action="append", default=[], metavar="KEY=VALUE",
                   help="fsspec storage option for DST (repeatable)")
    common_options(p)


@command("promote", "copy committed checkpoints to another tier (data first, manifest last)",
         _promote_args)
def _promote(args) -> int:
    from ckptstore.runs.promote import promote_step

    src = open_storage(args.src, storage_options(args))
    dst = open_storage(args.dst, storage_options(argparse.Namespace(storage_option=args.dst_option))
                       or storage_options(args))
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
    emit(args, {"src": src.url, "dst": dst.url, "promoted": results}, text)
    return 0


def _parent(s: Storage, name: str) -> Storage:
    """The run directory holding checkpoint ``s`` (named ``name``)."""
    return s.parent()


