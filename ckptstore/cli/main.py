"""The ``ckptstore`` command line: every subcommand module, one parser.

Exit codes: 0 success/clean, 1 damage found or the operation failed, 2 usage error
or PATH is not a checkpoint.
"""
from __future__ import annotations

import argparse
import logging
import sys

# each module registers its subcommands in COMMANDS when imported
from ckptstore.cli import fsck, interop, runs
from ckptstore.cli.base import COMMANDS
from ckptstore.errors import CheckpointNotFoundError, CkptError

SUBCOMMAND_MODULES = (fsck, interop, runs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ckptstore", description="Inspect, verify and manage ckptstore checkpoints.",
        epilog="exit codes: 0 ok, 1 damage found or operation failed, 2 usage error or "
               "not a checkpoint")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, fn, arguments) in sorted(COMMANDS.items()):
        p = sub.add_parser(name, help=help_text)
        arguments(p)
        p.set_defaults(run=fn)
    return parser


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
