"""The ``ckptstore`` command line: every subcommand module, one parser.

Exit codes: 0 success/clean, 1 damage found or the operation failed, 2 usage error
or PATH is not a checkpoint (missing, a file, a run directory...). Errors are one
line on stderr (``ckptstore CMD: message``); with ``--json`` also a JSON object on
stdout; ``-v`` adds the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ckptstore.cli.base import COMMANDS, emit_error
from ckptstore.errors import CkptError, DestinationNotWritableError, KeyNotFoundError
from ckptstore.version import __version__

#: each module registers its subcommands in COMMANDS when imported. Those that import
#: no torch come first: a command they register starts without importing the others
#: (``fsck``, ``ls`` and ``gc`` start without torch).
SUBCOMMAND_MODULES = ("ckptstore.cli.fsck", "ckptstore.cli.runs", "ckptstore.cli.inspect",
                      "ckptstore.cli.interop")

#: errors that mean "this path (or name) is not what the command needs": exit 2
WRONG_PATH = (FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError,
              DestinationNotWritableError, KeyNotFoundError)

log = logging.getLogger("ckptstore.cli")


def load_commands(name: str | None = None) -> None:
    """Import subcommand modules until command ``name`` is registered (all of them when
    ``name`` is None or no module registers it)."""
    for module in SUBCOMMAND_MODULES:
        if name is not None and name in COMMANDS:
            return
        importlib.import_module(module)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every subcommand (of ``command`` alone where its module is enough)."""
    load_commands(command)
    parser = argparse.ArgumentParser(
        prog="ckptstore", description="Inspect, verify and manage ckptstore checkpoints.",
        epilog="exit codes: 0 ok, 1 damage found or operation failed, 2 usage error or "
               "not a checkpoint")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, tracebacks")
    parser.add_argument("--version", action="version", version=f"ckptstore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, fn, arguments) in sorted(COMMANDS.items()):
        p = sub.add_parser(name, help=help_text, description=help_text)
        arguments(p)
        p.set_defaults(run=fn)
    return parser


def exit_code(e: BaseException) -> int | None:
    """The exit code for an error a command raised, or None for a bug (traceback)."""
    if isinstance(e, WRONG_PATH):
        return 2
    if isinstance(e, (CkptError, OSError)):
        return 1
    if isinstance(e, (ValueError, TypeError)) and not isinstance(e, CkptError):
        return 2  # a bad argument value, said by the library
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    words = [a for a in argv if not a.startswith("-")]
    parser = build_parser(words[0] if words else None)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0) if e.code in (0, None) else 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.run(args))
    except Exception as e:
        code = exit_code(e)
        if code is None:
            raise
        if args.verbose:
            log.debug("traceback", exc_info=True)
        emit_error(args, args.command, e, code)
        return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
