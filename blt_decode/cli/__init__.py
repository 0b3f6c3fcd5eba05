"""The command line: ``blt-decode`` (see docs/cli.md)."""

from blt_decode.cli.main import main

__all__ = ["main"]
