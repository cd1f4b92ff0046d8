"""What every subcommand shares: the registry (``@command``), common options,
output (``emit``: text or ``--json``) and progress bars."""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

Arguments = Callable[[argparse.ArgumentParser], None]
#: name -> (one-line summary, run(args) -> exit code, add_arguments(parser))
COMMANDS: dict[str, tuple[str, Callable[[argparse.Namespace], int], Arguments]] = {}


def command(name: str, summary: str, arguments: Arguments):
    """Register a subcommand: decorate ``run(args) -> exit code``; ``arguments``
    adds its flags to its parser."""
    def deco(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = (summary, fn, arguments)
        return fn
    return deco


def progress_bar(total: int, desc: str, unit: str = "B"):
    """A tqdm bar on a terminal, a no-op callable elsewhere: ``(update(n), close())``.
    ``unit="B"`` counts bytes and shows B, kB, MB... (1024 apart); any other unit
    counts items of that name."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        scaled = unit == "B"
        bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=scaled, unit_divisor=1024 if scaled else 1000,
                   leave=False, file=sys.stderr)
        return bar.update, bar.close
    return (lambda n: None), (lambda: None)


def emit(args, payload: dict, text: str) -> None:
    if getattr(args, "json", False):
        json.dump(payload, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(text + ("\n" if not text.endswith("\n") else ""))


def emit_error(args, command: str, e: BaseException, code: int) -> None:
    """One line on stderr (``ckptstore CMD: message``); with ``--json`` also an object
    on stdout: ``{"error": type, "message", "hint", "exit_code"}``."""
    message = str(e) or type(e).__name__
    sys.stderr.write(f"ckptstore {command}: {message if code == 2 else f'{type(e).__name__}: {message}'}\n")
    if getattr(args, "json", False):
        json.dump({"error": type(e).__name__, "message": message, "hint": getattr(e, "hint", None),
                   "exit_code": code}, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")


def common_options(p: argparse.ArgumentParser) -> None:
    """``--json`` and ``--storage-option KEY=VALUE``, which every subcommand takes."""
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help="fsspec storage option (repeatable)")


def storage_options(args) -> dict:
    """The ``--storage-option KEY=VALUE`` pairs as a dict for fsspec."""
    opts = {}
    for kv in getattr(args, "storage_option", []) or []:
        k, _, v = kv.partition("=")
        opts[k] = v
    return opts
