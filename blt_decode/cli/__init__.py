"""The command line: ``blt-decode`` (see docs/cli.md)."""

from blt_decode.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
