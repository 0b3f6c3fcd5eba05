"""What more than one command uses: the parser class, argument adders and types, reading prompts and
models, and the backend choice of ``--backend auto``."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Any, NoReturn, Sequence

import torch

import blt_decode
from blt_decode import api
from blt_decode.backends.compiled import require_compiler, unavailable
from blt_decode.checkpoints.resolve import check_device
from blt_decode.checks import int_argument, max_threads, threads_argument
from blt_decode.decoding import options
from blt_decode.engine.core import MAX_BATCH
from blt_decode.errors import CLIError
from blt_decode.plugins import registry as plugins

PROG = "blt-decode"
DTYPES = ("float32", "bfloat16", "float16", "float64")


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the message and where to get help), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


def strategy_options(strategy_name: str, pairs: Sequence[str]) -> dict[str, Any]:
    """``-o KEY=VALUE`` pairs as the strategy's options, each value parsed by the option's declared type."""
    return options.parse_option_strings(plugins.get_strategy(strategy_name), pairs)


#: the most bytes read from a prompt file (--prompt-file, bench's prompts): more than the longest sequence
#: any model may have (config.MAX_SEQLEN, 1 MiB) times bench's most prompts; /dev/zero is not read to the end
MAX_PROMPT_FILE_BYTES = 64 << 20


def read_file(path: str, what: str) -> bytes:
    """A file's raw bytes (``-`` = standard input), at most :data:`MAX_PROMPT_FILE_BYTES`, or one clear error."""
    try:
        if path == "-":
            data = sys.stdin.buffer.read(MAX_PROMPT_FILE_BYTES + 1)
        else:
            with Path(path).open("rb") as fh:
                data = fh.read(MAX_PROMPT_FILE_BYTES + 1)
    except OSError as exc:
        raise CLIError(f"cannot read {what} {path!r}: {exc.strerror or exc}") from None
    if len(data) > MAX_PROMPT_FILE_BYTES:
        raise CLIError(f"{what} {path!r} holds more than {MAX_PROMPT_FILE_BYTES >> 20} MiB, the most read as prompts")
    return data


def prompt_from_args(args: argparse.Namespace) -> bytes:
    """The prompt as raw bytes: the argument as the OS gave it (so a non-UTF-8 argument loses nothing),
    or ``--prompt-file`` (``-`` for stdin)."""
    if args.prompt_file is not None:
        if args.prompt is not None:
            raise CLIError("give the prompt either as an argument or with --prompt-file, not both")
        return read_file(args.prompt_file, "prompt file")
    if args.prompt is None:
        raise CLIError("no prompt: give it as an argument or with --prompt-file PATH (- for stdin)")
    return os.fsencode(args.prompt)


def model_from_args(args: argparse.Namespace, spec: str | None = None) -> blt_decode.BLTModel:
    """The model ``spec`` names (default: ``--model``), in ``--dtype`` on ``--device`` where the command has them."""
    dtype = getattr(torch, args.dtype) if getattr(args, "dtype", None) else None
    return api.load_model(spec or args.model, dtype=dtype, device=getattr(args, "device", None))


#: ``--backend auto`` (the default of generate, serve and eval humaneval) picks the compiled backend for a
#: server, and for work that requests at least this many new bytes, decoded one sequence at a time or
#: batched; eager below. These are where the compiled backend's warm-up from an empty inductor cache pays
#: for itself on the shipped model (docs/benchmarks.md, second round): one at a time, 93 s of warm-up and
#: then 514 vs 187 bytes/s, ~27 000 bytes; batched (16), 177 s and then 866 vs 663 bytes/s, ~500 000
AUTO_COMPILED_BYTES = {"one": 1 << 15, "batched": 1 << 19}
BACKEND_HELP = ("compute backend (see 'blt-decode backends'); auto: compiled for a server or for work of at least "
                f"{AUTO_COMPILED_BYTES['one']} requested new bytes ({AUTO_COMPILED_BYTES['batched']} batched: its "
                "warm-up then pays), eager otherwise (default: %(default)s)")


def backend_for(requested: str, *, new_bytes: int | None, work: str, batch_size: int = 1,
                device: str | None = None) -> str:
    """The backend a command runs: ``requested``, or for "auto" the compiled backend for a server
    (``new_bytes`` None) or work requesting at least :data:`AUTO_COMPILED_BYTES` new bytes (for its
    ``batch_size``), eager otherwise or where the compiled backend cannot run (said on stderr, with the
    reason)."""
    device = str(check_device(device) or "cpu")  # a device that cannot run is one line before anything
    if requested != "auto":
        # an unknown name fails here, with the registered ones; a backend that cannot run, before any work
        if plugins.get_backend(requested).name == "compiled":
            require_compiler(device)
        return requested
    if new_bytes is not None and new_bytes < AUTO_COMPILED_BYTES["one" if batch_size == 1 else "batched"]:
        return "eager"
    why = unavailable(device)
    say = f"{PROG}: backend auto: {{}}; --backend names one"
    if why is not None:
        print(say.format(f"eager, since the compiled backend cannot run: {why}"), file=sys.stderr, flush=True)
        return "eager"
    print(say.format(f"compiled ({work}: its warm-up pays for itself)"), file=sys.stderr, flush=True)
    return "compiled"


#: what lives as long as one command (the compile reports of compile_note); main() closes it, so a
#: process that runs several commands does not repeat their reports
PROCESS_SCOPE = contextlib.ExitStack()


def compile_note(backend: str, *, each_graph: bool = True) -> None:
    """Say on stderr that ``backend`` compiles before it is fast, and (``each_graph``) print a line for
    every graph it compiles, with its seconds, so that a warm-up is never silent. ``bench`` shows bars
    instead (``each_graph=False``)."""
    def say(message: str) -> None:
        print(f"{PROG}: {message}", file=sys.stderr, flush=True)

    if plugins.get_backend(backend).name != "compiled":
        return
    if backend != "compiled":
        say(f"backend {backend!r} is an alias of 'compiled'")
    say("compiled backend: compiling each step graph on first use (seconds each on a CPU; inductor's "
        "on-disk cache makes the next process much faster)")
    if each_graph:
        compiled = plugins.get_backend("compiled")
        compiled.progress = say
        PROCESS_SCOPE.callback(setattr, compiled, "progress", None)


non_negative_int = int_argument(0)
positive_int = int_argument(1)


def slots(text: str) -> int:
    """Requests decoded at once by one engine: 1..MAX_BATCH, checked before any file or model is read."""
    return int_argument(1, MAX_BATCH)(text)


_DECODING_THREADS_HELP = (
    "torch CPU threads (default: %(default)s; 0 = torch's default). Batch-1 decoding runs many tiny matrix "
    "products: extra OpenMP threads only add synchronisation, which on a busy machine can make each step many "
    "times slower. Raise it for large models.")


def add_threads_argument(parser: argparse.ArgumentParser, help: str = _DECODING_THREADS_HELP) -> None:
    """Add ``--threads``: torch CPU threads, default 1, 0 = torch's default, at most this machine's CPUs
    (checked by argparse). ``help`` is the flag's help text, before the CPU count."""
    # at most the CPU count: more never helps, and an absurd count crashed OpenMP (exit 139)
    parser.add_argument("--threads", type=threads_argument, default=1,
                        help=help + f" At most the number of CPUs ({max_threads()} here).")


MODEL_HELP = "checkpoint directory (native, Hugging Face or original layout), 'default' (the model shipped in the package), or random:PRESET[:SEED]"


def add_model_arguments(parser: argparse.ArgumentParser, default: str | None = "default", *, dtype: bool = True) -> None:
    """Add ``--model`` (defaulting to the ``default`` argument), ``--dtype`` (unless ``dtype`` is false) and
    ``--device``, as :func:`model_from_args` reads them."""
    parser.add_argument("--model", default=default, help=f"{MODEL_HELP} (default: %(default)s)")
    if dtype:
        parser.add_argument("--dtype", choices=DTYPES, default=None,
                            help="run the model in this dtype (default: float32; bfloat16/float16 for GPUs)")
    parser.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")


def add_prompt_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the optional ``prompt`` argument and ``--prompt-file``, as :func:`prompt_from_args` reads them."""
    parser.add_argument("prompt", nargs="?", default=None,
                        help="prompt text (taken as the raw bytes of the argument; see --prompt-file for files)")
    parser.add_argument("--prompt-file", metavar="PATH", default=None,
                        help="read the prompt's raw bytes from a file (- for stdin) instead of the argument")


def add_strategy_arguments(parser: argparse.ArgumentParser, default: str = "autoregressive") -> None:
    """Add ``--strategy`` and the repeatable ``--option``/``-o KEY=VALUE`` (see :func:`strategy_options`)."""
    parser.add_argument("--strategy", default=default, help="decoding strategy (see 'blt-decode strategies') (default: %(default)s)")
    parser.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                        help="strategy option (repeatable); the value is parsed by the option's declared type")
