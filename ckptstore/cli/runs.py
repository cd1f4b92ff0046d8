"""``ckptstore ls``, ``gc``, ``promote`` and ``repair``: runs of step checkpoints on
any tier.

Arguments and output only; the work is in :mod:`ckptstore.runs` (``listing``,
``gc``, ``promote``, ``repair``, ``deps``). None of them imports torch.

``--json`` fields: ``ls``: ``url``, ``tier``, ``steps`` (``step``, ``name``, ``state``,
``committed``, ``added_bytes``, ``stored_bytes``, ``logical_bytes``, ``ratio``,
``age_seconds``, ``problem``, ``depends_on``: the other step directories whose files a
committed step reads, empty for a full save); ``gc``: ``url``, ``dry_run``,
``grace_seconds``, ``removed``, ``count`` (``gc --memory``: ``parent``, ``dry_run``,
``removed`` and ``kept``: memory tiers as ``path``, ``owner_pid``, ``alive``, ``bytes``,
``steps``); ``promote``: ``src``, ``dst``, ``promoted``
(``name``, ``dst``, ``files``, ``uploaded_files``, ``uploaded_bytes``, ``already``),
``uploaded_bytes``; ``repair``: ``url``, ``remote``, ``ok``, ``steps`` (``name``, ``ok``,
``damaged``, ``repaired`` (``dir``, ``file``, ``source``), ``unrepaired``).
"""
from __future__ import annotations

import argparse
from dataclasses import asdict

from ckptstore import manifest as fmt
from ckptstore.cli.base import command, common_options, emit, progress_bar, storage_options
from ckptstore.runs.deps import describe as describe_deps
from ckptstore.runs.gc import DEFAULT_GRACE, gc
from ckptstore.runs.listing import StepInfo, check_run, list_steps
from ckptstore.storage import Storage, open_storage


def human(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _state(s: StepInfo) -> str:
    return "committed" if s.committed else ("damaged" if s.problem else "incomplete")


def _ls_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", help="run directory or URL (holds step-NNNNNNNNNNNN directories)")
    common_options(p)


@command("ls", "list the steps of a run: committed or not, bytes added, ratio, age, bases",
         _ls_args)
def _ls(args) -> int:
    root = open_storage(args.url, storage_options(args))
    check_run(root)
    steps = list_steps(root)
    lines = [f"{'step':>12}  {'state':<10} {'added':>10} {'stored':>10} {'ratio':>6}  {'age':>8}  reads"]
    for s in steps:
        age = "-" if s.age_seconds is None else f"{s.age_seconds:.0f}s"
        ratio = "-" if s.ratio is None else f"{s.ratio:.3f}"
        lines.append(f"{s.step:>12}  {_state(s):<10} {human(s.added_bytes):>10} "
                     f"{human(s.stored_bytes):>10} {ratio:>6}  {age:>8}  "
                     f"{describe_deps(list(s.depends_on)) if s.committed else '-'}")
    if not steps:
        lines.append("(no step directories)")
    scheme, sep, _ = root.url.partition("://")
    tier = "local" if root.capabilities.local_path else (scheme if sep else "remote")
    lines.insert(0, f"{root.url} ({tier})")
    emit(args, {"url": root.url, "tier": tier,
                "steps": [{**asdict(s), "state": _state(s)} for s in steps]},
         "\n".join(lines))
    return 0


# -- gc ---------------------------------------------------------------------


def _gc_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", nargs="?", help="run directory or URL (or one checkpoint: its temp files)")
    p.add_argument("--memory", action="store_true",
                   help="instead: remove the memory tiers of runs whose process is gone "
                        "(below $CKPTSTORE_MEMORY_DIR or /dev/shm/ckptstore-<uid>)")
    p.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    p.add_argument("--grace", type=float, default=DEFAULT_GRACE,
                   help=f"leave anything younger than this many seconds (default {DEFAULT_GRACE:.0f})")
    common_options(p)


@command("gc", "remove temp files, unreferenced shards and incomplete uploads of a run",
         _gc_args)
def _gc(args) -> int:
    if args.memory:
        return _gc_memory(args)
    if args.url is None:
        raise ValueError("gc needs a run directory or URL (or --memory for memory tiers)")
    root = open_storage(args.url, storage_options(args))
    # an object store prefix with no objects may still hold incomplete uploads
    check_run(root, checkpoint_ok=True, missing_ok=not root.capabilities.local_path)
    removed = gc(root, grace=args.grace, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    text = "\n".join(f"{verb} {r}" for r in removed) or "nothing to remove"
    emit(args, {"url": root.url, "dry_run": args.dry_run, "grace_seconds": args.grace,
                "removed": removed, "count": len(removed)}, text)
    return 0


def _gc_memory(args) -> int:
    from ckptstore.runs.memory import gc_memory, memory_parent, memory_tiers

    parent = memory_parent()
    removed = gc_memory(parent, dry_run=args.dry_run)
    kept = [t for t in memory_tiers(parent) if t.alive]
    verb = "would remove" if args.dry_run else "removed"
    lines = [f"{verb} {t.path} ({human(t.bytes)}, steps {list(t.steps)}, owner pid {t.owner_pid} "
             "is gone)" for t in removed]
    lines += [f"kept {t.path} ({human(t.bytes)}, owner pid {t.owner_pid} is running)" for t in kept]
    emit(args, {"parent": str(parent), "dry_run": args.dry_run,
                "removed": [asdict(t) for t in removed], "kept": [asdict(t) for t in kept]},
         "\n".join(lines) or f"no memory tiers in {parent}")
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
    dst = _other_storage(args.dst, args.dst_option, args)
    check_run(src, checkpoint_ok=True)
    if src.exists(fmt.MANIFEST_NAME):  # one checkpoint: SRC's own name is the step name
        name = src.url.rstrip("/").rpartition("/")[2]
        m = fmt.read_manifest(src)
        todo, src = [(name, sum(f.size for f in m.files))], _parent(src)
    else:
        todo = [(s.name, s.stored_bytes) for s in list_steps(src) if s.committed]
    update, close = progress_bar(sum(n for _, n in todo), "promote", unit="B")
    results = []
    try:
        for name, nbytes in todo:
            results.append(asdict(promote_step(src, dst, name)))
            update(nbytes)  # the step's bytes are on DST now (uploaded or already there)
    finally:
        close()
    text = "\n".join(f"{r['name']}: {'already there' if r['already'] else 'promoted'}, "
                     f"{r['uploaded_files']} files, {human(r['uploaded_bytes'])} uploaded"
                     for r in results) or "no committed checkpoints to promote"
    emit(args, {"src": src.url, "dst": dst.url, "promoted": results,
                "uploaded_bytes": sum(r["uploaded_bytes"] for r in results)}, text)
    return 0


# -- repair -----------------------------------------------------------------


def _repair_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", help="local run directory (holds step-NNNNNNNNNNNN directories)")
    p.add_argument("remote", help="run directory/URL of the tier holding promoted copies")
    p.add_argument("--step", type=int, action="append", default=[], metavar="N",
                   help="repair only this step (repeatable; default: every committed step)")
    p.add_argument("--remote-option", action="append", default=[], metavar="KEY=VALUE",
                   help="fsspec storage option for REMOTE (repeatable)")
    common_options(p)


@command("repair", "verify a run's steps; replace damaged files by verified copies from REMOTE",
         _repair_args)
def _repair(args) -> int:
    from ckptstore.runs.layout import committed_steps, step_name
    from ckptstore.runs.repair import repair_step

    root = open_storage(args.url, storage_options(args))
    remote = _other_storage(args.remote, args.remote_option, args)
    check_run(root)
    names = [step_name(s) for s in (args.step or committed_steps(root))]
    reports = [repair_step(root, remote, n) for n in names]
    lines = []
    for r in reports:
        lines.append(f"{r.name}: " + ("OK" if not r.damaged else "repaired" if r.ok else "DAMAGED"))
        lines += [f"  repaired {x.dir}/{x.file} from {x.source}" for x in r.repaired]
        lines += [f"  not repaired: {u}" for u in r.unrepaired]
    ok = all(r.ok for r in reports)
    emit(args, {"url": root.url, "remote": remote.url, "ok": ok,
                "steps": [{**asdict(r), "ok": r.ok} for r in reports]},
         "\n".join(lines) or "no committed steps")
    return 0 if ok else 1


def _other_storage(url: str, own_options: list[str], args) -> Storage:
    """The second storage of a command (promote's DST, repair's REMOTE): its own
    ``KEY=VALUE`` options, else the command's ``--storage-option`` ones."""
    return open_storage(url, storage_options(argparse.Namespace(storage_option=own_options))
                        or storage_options(args))


def _parent(s: Storage) -> Storage:
    """The run directory holding checkpoint ``s``."""
    return s.parent()
