"""``blt-decode generate``: one generation printed as it is decoded, or a resumable batch job (``--input``)
on the engine or on Ray Data."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import attrs

from blt_decode import api
from blt_decode.checks import int_argument
from blt_decode.cli.common import (BACKEND_HELP, PROG, add_model_arguments, add_prompt_arguments,
                                   add_strategy_arguments, add_threads_argument, backend_for, compile_note,
                                   model_from_args, prompt_from_args, slots, strategy_options)
from blt_decode.decoding import stats as decoding_stats
from blt_decode.engine.request import prepare
from blt_decode.errors import CLIError
from blt_decode.model import tokenizer
from blt_decode.serving import local_ray_environment, require
from blt_decode.tools import jobs


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """``blt-decode generate``."""
    gen = sub.add_parser("generate", help="generate bytes after a prompt")
    add_prompt_arguments(gen)
    add_model_arguments(gen)
    add_strategy_arguments(gen)
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
    gen.add_argument("--batch-size", type=slots, default=16,
                     help="requests decoded at once by the batched engine (default: %(default)s)")
    gen.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                     help="with --input: run the job on Ray Data, an actor pool with one model per actor; alone, a "
                          "local Ray cluster is started, with ADDRESS it is joined (needs the ray extra)")
    gen.add_argument("--ray-actors", type=int_argument(1, 1024), default=2,
                     help="actors in the pool (with --ray), 1..1024 (default: %(default)s)")
    add_threads_argument(gen)
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
    args.backend = backend_for(args.backend, new_bytes=new_bytes, work=f"{new_bytes} new bytes", device=args.device)
    stream = api.stream(
        model, prompt, strategy=args.strategy, backend=args.backend, max_new_bytes=args.max_new_bytes,
        stop=[os.fsencode(s) for s in args.stop], seed=args.seed, **strategy_options(args.strategy, args.option),
    )
    compile_note(args.backend)
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
        args.backend = backend_for(args.backend, new_bytes=requested,
                                   work=f"a job of {len(items)} requests, {requested} new bytes",
                                   batch_size=args.batch_size, device=args.device)
        compile_note(args.backend)
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
    stats = stream.stats
    assert stats is not None and stream.output is not None
    reference = decoding_stats.autoregressive_passes(stream.model, stream.prompt, stream.output, stats.new_tokens)
    lines = decoding_stats.summary(stats, reference if reference != stats.passes else None)
    lines[0] += f"; {stream.strategy.name} on {stream.backend.name}"
    for line in lines:
        print(f"{PROG}: {line}", file=sys.stderr)


def _run_job_on_ray(args: argparse.Namespace, items: list) -> Any:
    """``generate --input ... --ray [ADDRESS]``: the batch job as Ray Data map_batches over an actor pool."""
    if not args.ray:
        local_ray_environment()  # before Ray is imported: a local cluster listens on loopback only
    require("ray", "generate --ray")
    from blt_decode.serving.ray_data import run_job_ray  # lazy: the ray extra

    return run_job_ray(args.model, items, args.output, address=args.ray or None, actors=args.ray_actors,
                       batch_size=args.batch_size, backend=args.backend, threads=args.threads,
                       dtype=args.dtype, device=args.device)
