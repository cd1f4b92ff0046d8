"""CLI subcommands ``export``, ``import`` and ``diff`` (see :mod:`ckptstore.interop`).

A selection that matches nothing, an ambiguous model subtree or a missing config
exits 2 with one line that says which option to pass (with ``--json`` also an error
object on stdout).
"""
from __future__ import annotations

import argparse

from ckptstore.cli.base import command, common_options, emit, emit_error, progress_bar, storage_options
from ckptstore.errors import KeyNotFoundError
from ckptstore.interop.select import InteropUsageError


def _usage(args, e: Exception) -> int:
    emit_error(args, args.command, e, 2)
    return 2


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="checkpoint directory or URL")
    p.add_argument("out", help="output .safetensors file, or folder with --format hf")
    p.add_argument("--format", default="safetensors", choices=["safetensors", "hf"],
                   help="safetensors: one plain file; hf: a Hugging Face model folder "
                        "(config.json, model.safetensors or shards + index) for from_pretrained")
    p.add_argument("--keys", action="append", default=[], metavar="NAME_OR_PREFIX",
                   help="export only these names or prefixes (repeatable), e.g. model. "
                        "(hf: default is the model's subtree, found from the tree)")
    p.add_argument("--strip-prefix", default=None, metavar="PREFIX",
                   help="remove PREFIX from the written names (e.g. model.); others are skipped")
    p.add_argument("--config", default=None, metavar="CONFIG_JSON",
                   help="hf: config.json to write (default: the 'hf_config' kept in the metadata)")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="hf: split the weights into shards of at most SIZE (e.g. 5GB, 500MB)")
    p.add_argument("--overwrite", action="store_true", help="hf: replace an existing folder OUT")
    common_options(p)


@command("export", "write a checkpoint's weights as a .safetensors file or a Hugging Face folder",
         _export_args)
def _export(args) -> int:
    from ckptstore.interop.convert import export_safetensors
    from ckptstore.interop.hf import export_hf
    from ckptstore.interop.select import select
    from ckptstore.read.lazy import open as open_lazy

    opts = storage_options(args)
    keys = args.keys or None
    hf = args.format == "hf"
    try:
        sel = select(open_lazy(args.path, storage_options=opts), keys=keys,
                     strip_prefix=args.strip_prefix, auto=hf)
        update, close = progress_bar(sum(e.nbytes for e in sel.entries), "export")
        try:
            if hf:
                res = export_hf(args.path, args.out, keys=keys, strip_prefix=args.strip_prefix,
                                config=args.config, max_shard_size=args.max_shard_size,
                                overwrite=args.overwrite, storage_options=opts, progress=update)
            else:
                names = export_safetensors(args.path, args.out, keys=keys,
                                           strip_prefix=args.strip_prefix, storage_options=opts,
                                           progress=update)
        finally:
            close()
    except (InteropUsageError, KeyNotFoundError) as e:
        return _usage(args, e)
    if hf:
        tied = "".join(f"\n  {a} not written: tied to {b} (from_pretrained re-ties it)"
                       for a, b in res.tied)
        emit(args, res.to_json(),
             f"{res.selection}\nwrote {len(res.tensors)} tensors ({res.nbytes} bytes) in "
             f"{len(res.files)} file(s) to {res.out}, config from {res.config_from}{tied}")
        return 0
    nbytes = sum(e.nbytes for e in sel.entries)
    emit(args, {"out": args.out, "format": "safetensors", "tensors": names, "bytes": nbytes},
         f"wrote {len(names)} tensors ({nbytes} bytes) to {args.out}")
    return 0


def _import_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help=".safetensors file, torch.save file (weights_only), DCP directory, "
                                "or Hugging Face model folder / model.safetensors.index.json")
    p.add_argument("dest", help="new checkpoint directory or URL")
    p.add_argument("--compression", default="auto", choices=["auto", "none", "zstd", "lz4"])
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint at DEST")
    common_options(p)


@command("import", "convert a .safetensors or torch.save file, a DCP directory or a Hugging Face "
         "model folder", _import_args)
def _import(args) -> int:
    from ckptstore.interop.convert import import_checkpoint, source_bytes

    update, close = progress_bar(source_bytes(args.file), "import")
    try:
        res = import_checkpoint(args.file, args.dest, compression=args.compression,
                                overwrite=args.overwrite, storage_options=storage_options(args),
                                progress=update)
    except InteropUsageError as e:
        return _usage(args, e)
    finally:
        close()
    kept = f"; metadata keeps {', '.join(res.metadata_keys)}" if res.metadata_keys else ""
    emit(args, res.to_json(),
         f"imported {res.tensors} tensors ({res.nbytes} bytes) from {res.source} ({res.format}) "
         f"into {res.dest}{kept}")
    return 0


def _diff_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", help="checkpoint A")
    p.add_argument("b", help="checkpoint B")
    p.add_argument("--deep", action="store_true",
                   help="read and compare the tensors' data (default: compare the content "
                        "hashes in the manifests, reading no data)")
    common_options(p)


@command("diff", "list keys added, removed and changed between checkpoints A and B "
         "(by the manifests' content hashes; --deep compares the data)", _diff_args)
def _diff(args) -> int:
    from ckptstore.interop.convert import diff
    from ckptstore.read.lazy import open as open_lazy

    opts = storage_options(args)
    total = sum(i.nbytes for i in open_lazy(args.a, storage_options=opts).infos().values())
    update, close = progress_bar(total, "diff")
    try:
        report = diff(args.a, args.b, deep=args.deep, storage_options=opts, progress=update)
    finally:
        close()
    lines = [f"+ {n}" for n in report.added] + [f"- {n}" for n in report.removed]
    lines += [f"~ {n}: {why}" for n, why in report.changed]
    lines.append(f"{len(report.added)} added, {len(report.removed)} removed, "
                 f"{len(report.changed)} changed, {report.same} unchanged")
    lines.append(f"({report.method})")
    emit(args, report.to_json(), "\n".join(lines))
    return 0 if report.identical else 1
