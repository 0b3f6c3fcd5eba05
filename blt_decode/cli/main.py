"""The ``blt-decode`` command line: one module per command group, each command's flags next to its handler;
here the parser of them all and the error boundary, where every user error becomes one line
``blt-decode: error: ...`` on stderr and exit status 2, without a traceback."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import torch

import blt_decode
from blt_decode.checks import max_threads
from blt_decode.cli import evaluate, generate, inspection, registry, serve, train
from blt_decode.cli.common import PROCESS_SCOPE, PROG, ArgumentParser
from blt_decode.errors import BLTDecodeError


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``blt-decode`` and all its commands (each handler set as ``func``)."""
    parser = ArgumentParser(prog=PROG, description="Fast decoding of Byte Latent Transformers.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {blt_decode.__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=ArgumentParser, metavar="COMMAND")
    # the order of `blt-decode --help`
    for group in (generate, train, inspection, serve, evaluate, registry):
        group.add_parsers(sub)
    return parser


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.strerror or exc}: {exc.filename}"
    text = str(exc).strip()
    return " ".join(text.split("\n")) if text else type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``blt-decode`` with ``argv`` (default: ``sys.argv[1:]``) and return the exit status; a
    :class:`~blt_decode.errors.BLTDecodeError` or ``OSError`` becomes one line on stderr and status 2. Usage
    errors and ``--help``/``--version`` exit through argparse (``SystemExit``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # bare `blt-decode`: say what there is
        parser.print_help()
        return 0
    if args.command == "trace" and args.format is None:
        args.format = "none" if args.html else "terminal"
    try:
        threads = getattr(args, "threads", None)
        # inside the try: `train --threads` is a plain int, torch raises a RuntimeError on a negative one and
        # OpenMP crashed the process (exit 139) on 100000
        if threads is not None and not 0 <= threads <= max_threads():
            raise BLTDecodeError(f"--threads must be an integer in 0..{max_threads()} (0 = torch's default; at most "
                                 f"this machine's CPUs), got {threads}")
        if threads:
            torch.set_num_threads(threads)
        return args.func(args)
    except BrokenPipeError:
        return 0
    except (BLTDecodeError, OSError) as exc:
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    finally:
        PROCESS_SCOPE.close()


if __name__ == "__main__":
    sys.exit(main())
