"""The ``ckptstore`` command line (``main``) and its subcommands."""
from ckptstore.cli.main import COMMANDS, build_parser, main

__all__ = ["COMMANDS", "build_parser", "main"]
