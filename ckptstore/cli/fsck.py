"""CLI subcommand ``fsck``: verify a checkpoint, name every damaged tensor and chunk."""
from __future__ import annotations

import argparse

from ckptstore.cli.base import command, common_options, emit, progress_bar, storage_options
from ckptstore.errors import CheckpointNotFoundError, CkptError


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
    lines += [f"  damaged: {d}" for d in report.damage]
    emit(args, report.to_json(), "\n".join(lines))
    return 0 if report.ok else 1
