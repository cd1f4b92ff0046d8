"""The ``ckptstore`` command line. Subcommands register themselves in COMMANDS.

Exit codes: 0 success/clean, 1 damage found or the operation failed, 2 usage error
or PATH is not a checkpoint.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable

from ckptstore.errors import CheckpointNotFoundError, CkptError

#: name -> (one-line summary, run(args) -> exit code); ``run.arguments(parser)`` adds flags
COMMANDS: dict[str, tuple[str, Callable]] = {}


def command(name: str, summary: str):
    """Register a subcommand: decorate ``run(args)``; ``run.arguments(parser)`` adds flags."""
    def deco(fn):
        COMMANDS[name] = (summary, fn)
        return fn
    return deco


def progress_bar(total: int, desc: str):
    """A tqdm bar on a terminal, a no-op callable elsewhere."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, leave=False)
        return bar.update, bar.close
    return (lambda n: None), (lambda: None)


def emit(args, payload: dict, text: str) -> None:
    if getattr(args, "json", False):
        json.dump(payload, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(text + ("\n" if not text.endswith("\n") else ""))


def _fsck_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="checkpoint directory or URL")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.add_argument("--deep", action="store_true", help="also decompress and check raw hashes")
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE")


@command("fsck", "verify a checkpoint: manifest, files, every chunk hash")
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


_fsck.arguments = _fsck_args  # type: ignore[attr-defined]


def storage_options(args) -> dict:
    opts = {}
    for kv in getattr(args, "storage_option", []) or []:
        k, _, v = kv.partition("=")
        opts[k] = v
    return opts


def build_parser() -> argparse.ArgumentParser:
    _load_plugins()
    parser = argparse.ArgumentParser(
        prog="ckptstore", description="Inspect, verify and manage ckptstore checkpoints.",
        epilog="exit codes: 0 ok, 1 damage found or operation failed, 2 usage error or "
               "not a checkpoint")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, fn) in sorted(COMMANDS.items()):
        p = sub.add_parser(name, help=help_text)
        getattr(fn, "arguments", lambda _p: None)(p)
        p.set_defaults(run=fn)
    return parser


def _load_plugins() -> None:
    """Import the modules that register more subcommands (ls, gc, promote, ...)."""
    import importlib

    for mod in ("runs", "interop"):
        try:
            importlib.import_module(f".{mod}", __package__)
        except ModuleNotFoundError as e:
            if e.name != f"{__package__}.{mod}":
                raise


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0) if e.code in (0, None) else 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.run(args))
    except CheckpointNotFoundError as e:
        sys.stderr.write(f"ckptstore {args.command}: {e}\n")
        return 2
    except CkptError as e:
        sys.stderr.write(f"ckptstore {args.command}: {type(e).__name__}: {e}\n")
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
