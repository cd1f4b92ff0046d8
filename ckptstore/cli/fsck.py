"""CLI subcommand ``fsck``: verify a checkpoint, name every damaged tensor and chunk.

Besides the report's fields, ``--json`` has ``depends_on`` (the other step
directories whose files the checkpoint reads: its incremental bases) and, in each
``damage`` entry, ``held_by`` (the step directory holding the damaged file)."""
from __future__ import annotations

import argparse

from ckptstore.cli.base import command, common_options, emit, progress_bar, storage_options
from ckptstore.errors import CheckpointNotFoundError, CkptError
from ckptstore.runs.deps import depends_on, holder


def _fsck_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="checkpoint directory or URL")
    p.add_argument("--deep", action="store_true", help="also decompress and check raw hashes")
    common_options(p)


@command("fsck", "verify a checkpoint: manifest, files, every chunk hash",
         _fsck_args)
def _fsck(args) -> int:
    from ckptstore.manifest.io import read_manifest
    from ckptstore.storage import open_storage
    from ckptstore.verify.fsck import fsck

    storage = open_storage(args.path, storage_options(args))
    total = 0
    own = storage.url.rstrip("/").rpartition("/")[2]
    m = None
    try:
        m = read_manifest(storage)
        total = sum(c.length for t in m.tensors for c in t.chunks)
    except CheckpointNotFoundError:
        raise
    except CkptError:
        pass  # fsck reports the damaged manifest itself
    update, close = progress_bar(total, "fsck")
    try:
        report = fsck(storage, deep=args.deep, progress=update)
    finally:
        close()
    lines = [f"{report.path}: {'OK' if report.ok else 'DAMAGED'} — {report.tensors} tensors, "
             f"{report.chunks} chunks, {report.files} files, {report.bytes_checked} bytes checked"]
    deps = [] if m is None else depends_on(m)
    held = {d.file: holder(m, own, d.file) for d in report.damage if m is not None and d.file}
    if deps:
        lines.append(f"  reads files of: {', '.join(deps)}")
    for d in report.damage:
        home = held.get(d.file or "", own)
        lines.append(f"  damaged: {d}" + (f" (a file of {home})" if home != own else ""))
    out = report.to_json()
    out["depends_on"] = deps
    for d in out["damage"]:  # the step directory that holds each damaged file
        d["held_by"] = held.get(d["file"] or "", own)
    emit(args, out, "\n".join(lines))
    return 0 if report.ok else 1
