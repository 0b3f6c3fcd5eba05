"""``blt-decode exactness``, ``convert``, ``trace`` and ``bench``: looking at a model and its strategies
(flips in low precision, checkpoint layouts, a traced decode, speed side by side)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import attrs
import torch

from blt_decode import api
from blt_decode.checkpoints import formats
from blt_decode.checkpoints._common import read_json
from blt_decode.checkpoints.native import CONFIG_FILE, save_model, source_digest
from blt_decode.checkpoints.resolve import DEFAULT_MODEL_DIR
from blt_decode.checks import int_argument
from blt_decode.cli.common import (DTYPES, MODEL_HELP, add_model_arguments, add_prompt_arguments,
                                   add_strategy_arguments, add_threads_argument, backend_for, compile_note,
                                   model_from_args, non_negative_int, positive_int, prompt_from_args, read_file,
                                   strategy_options)
from blt_decode.engine.core import MAX_BATCH
from blt_decode.errors import CLIError
from blt_decode.tools import bench, exactness, prompt_sets, render


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """``blt-decode exactness``, ``convert``, ``trace`` and ``bench``."""
    for add in (_add_exactness_parser, _add_convert_parser, _add_trace_parser, _add_bench_parser):
        add(sub)


def _add_trace_parser(sub: argparse._SubParsersAction) -> None:
    tr = sub.add_parser("trace", help="show how a strategy decoded: patches, entropies, drafts, diffusion passes")
    add_prompt_arguments(tr)
    add_model_arguments(tr)
    add_strategy_arguments(tr)
    tr.add_argument("--max-new-bytes", type=int, default=128, help="(default: %(default)s)")
    tr.add_argument("--html", metavar="PATH", help="write a self-contained HTML page")
    tr.add_argument("--format", choices=("terminal", "none"), default=None,
                    help="print a text view (default: terminal unless --html is given); coloured only on a "
                         "terminal and never when NO_COLOR is set")
    add_threads_argument(tr)
    tr.set_defaults(func=_cmd_trace)


def _cmd_trace(args: argparse.Namespace) -> int:
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
    add_model_arguments(ex, dtype=False)
    add_strategy_arguments(ex, default="blt-s")
    ex.add_argument("--dtype", action="append", choices=["float32", "bfloat16", "float64"], default=None,
                    help="dtype to measure (repeatable; default: float32 and bfloat16)")
    ex.add_argument("--prompts", type=positive_int, default=20, help="number of stdlib prompts (default: %(default)s)")
    ex.add_argument("--max-new-bytes", type=int, default=256, help="(default: %(default)s)")
    add_threads_argument(ex)
    ex.set_defaults(func=_cmd_exactness)


def _cmd_exactness(args: argparse.Namespace) -> int:
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
    conv.add_argument("--dtype", choices=DTYPES, default=None,
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
    if src == "default":  # the spec, as load_model reads it, before any directory of that name
        return {"from": "default", "source_sha256": source_digest(DEFAULT_MODEL_DIR)}
    path = Path(src)
    if not path.is_dir():
        return {"from": src}  # random:PRESET[:SEED] names its weights exactly
    inside = not path.is_absolute() and ".." not in path.parts and not src.startswith("~") and path.parts
    return {"from": path.as_posix() if inside else path.resolve().name, "source_sha256": source_digest(path)}


def _native_metadata(path: Path) -> dict:
    """The ``metadata`` of the native checkpoint directory ``path`` (training provenance), or {}."""
    metadata = read_json(path / CONFIG_FILE).get("metadata")
    return metadata if isinstance(metadata, dict) else {}


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers in 1..{MAX_BATCH}, got {text!r}") from None
    if not sizes or min(sizes) < 1 or max(sizes) > MAX_BATCH:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers in 1..{MAX_BATCH}, got {text!r}")
    return sizes


def _add_bench_parser(sub: argparse._SubParsersAction) -> None:
    be = sub.add_parser("bench", help="benchmark strategies x backends side by side on one model")
    add_model_arguments(be, default=None)
    be.add_argument("--strategies", default="ar,blt-s:k=4,blt-s:k=8,blt-s:k=16",
                    help="comma-separated NAME[:key=value+key=value] (default: %(default)s)")
    be.add_argument("--backends", default="eager,compiled",
                    help="comma-separated backends, side by side (default: %(default)s; the compiled backend's "
                         "warm-up is timed apart)")
    be.add_argument("--prompt-set", default="heldout", choices=prompt_sets.PROMPT_SETS,
                    help="built-in prompt set (versioned package data) (default: %(default)s)")
    be.add_argument("--prompts", type=non_negative_int, default=8, help="prompts from the prompt set (default: %(default)s)")
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
    add_threads_argument(be)
    be.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.plot:
        bench.require_matplotlib()  # before minutes of benchmarking, not after
    model = args.model
    if model is None:  # the shipped model when there is one, else a random model of BLT-1B proportions
        model = "default" if api.default_model_available() else "random:small"
    if args.prompt_file:
        prompts = prompt_sets.from_bytes(read_file(args.prompt_file, "prompt file"), args.prompt_file)
        prompt_set = f"your file {args.prompt_file}"
    else:
        prompts, prompt_set = prompt_sets.load(args.prompt_set, args.prompts), prompt_sets.label(args.prompt_set)
    specs = bench.parse_strategies(args.strategies)
    backends = [backend_for(b.strip(), new_bytes=0, work="", device=args.device)
                for b in args.backends.split(",") if b.strip()]
    for name in backends:
        compile_note(name, each_graph=False)  # the warm-ups show bars
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
