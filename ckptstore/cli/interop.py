"""CLI subcommands ``export``, ``import`` and ``diff`` (see :mod:`ckptstore.interop.convert`)."""
from __future__ import annotations

import argparse

from ckptstore.cli.base import command, common_options, emit, storage_options


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="checkpoint directory or URL")
    p.add_argument("out", help="output .safetensors file")
    p.add_argument("--keys", action="append", default=[], metavar="NAME_OR_PREFIX",
                   help="export only these names or prefixes (repeatable), e.g. model.")
    p.add_argument("--strip-prefix", default=None, metavar="PREFIX",
                   help="remove PREFIX from the written names (e.g. model.); others are skipped")
    common_options(p)


@command("export", "write a checkpoint's tensors (weights only) to a plain .safetensors file",
         _export_args)
def _export(args) -> int:
    from ckptstore.interop.convert import export_safetensors

    names = export_safetensors(args.path, args.out, keys=args.keys or None,
                               strip_prefix=args.strip_prefix, storage_options=storage_options(args))
    emit(args, {"out": args.out, "tensors": names},
         f"wrote {len(names)} tensors to {args.out}")
    return 0


def _import_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help=".safetensors file, torch.save file (weights_only) or DCP directory")
    p.add_argument("dest", help="new checkpoint directory or URL")
    p.add_argument("--compression", default="auto", choices=["auto", "none", "zstd", "lz4"])
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint at DEST")
    common_options(p)


@command("import", "convert a .safetensors file, a torch.save file or a DCP directory",
         _import_args)
def _import(args) -> int:
    from ckptstore.interop.convert import import_checkpoint

    result = import_checkpoint(args.file, args.dest, compression=args.compression,
                               overwrite=args.overwrite, storage_options=storage_options(args))
    emit(args, {"dest": args.dest, "result": repr(result)}, f"imported {args.file} into {args.dest}")
    return 0


def _diff_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", help="checkpoint A")
    p.add_argument("b", help="checkpoint B")
    common_options(p)


@command("diff", "list keys added, removed and changed between checkpoints A and B",
         _diff_args)
def _diff(args) -> int:
    from ckptstore.interop.convert import diff

    report = diff(args.a, args.b, storage_options=storage_options(args))
    lines = [f"+ {n}" for n in report.added] + [f"- {n}" for n in report.removed]
    lines += [f"~ {n}: {why}" for n, why in report.changed]
    lines.append(f"{len(report.added)} added, {len(report.removed)} removed, "
                 f"{len(report.changed)} changed, {report.same} unchanged")
    emit(args, report.to_json(), "\n".join(lines))
    return 0 if report.identical else 1


