"""The ``blt-decode`` command line. Thin: parses arguments, calls the API, prints."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import attrs
import torch

from blt_decode import api, formats, plugins, tokenizer
from blt_decode.errors import BLTDecodeError


def parse_option_value(text: str) -> Any:
    """``--option key=value`` values: ints, floats, true/false, none, else the string itself."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_options(pairs: Sequence[str]) -> dict[str, Any]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise BLTDecodeError(f"--option expects key=value, got {pair!r}")
        options[key.strip().replace("-", "_")] = parse_option_value(value.strip())
    return options


def _cmd_generate(args: argparse.Namespace) -> int:
    options = parse_options(args.option)
    stream = api.stream(
        args.model, args.prompt, strategy=args.strategy, backend=args.backend, max_new_bytes=args.max_new_bytes,
        stop=args.stop, seed=args.seed, **options,
    )
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
    out = sys.stdout.buffer
    out.write(stream.prompt)
    out.flush()
    for chunk in stream:  # printed as the strategy commits it
        out.write(chunk)
        out.flush()
    out.write(b"\n")
    out.flush()
    return 0


def _print_table(rows: list[tuple[str, str]]) -> None:
    width = max((len(a) for a, _ in rows), default=0)
    for name, text in rows:
        print(f"{name:<{width}}  {text}")


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


def _cmd_backends(args: argparse.Namespace) -> int:
    registered = plugins.backends()
    _print_table([(name, registered[name].description) for name in plugins.backend_names()])
    return 0


def _cmd_exactness(args: argparse.Namespace) -> int:
    from blt_decode import exactness

    options = parse_options(args.option)
    prompts = exactness.stdlib_snippets(args.prompts)
    rows = []
    for dtype_name in args.dtype or ["float32", "bfloat16"]:
        model = api.load_model(args.model, dtype=getattr(torch, dtype_name))
        rows.append(exactness.measure_flips(model, args.strategy, options, prompts=prompts,
                                            max_new_bytes=args.max_new_bytes))
    print(f"{'strategy':<10} {'dtype':<9} {'bytes':>7} {'flips':>6} {'flips/10k':>10} {'near-ties/10k':>14} {'accept':>7}")
    for r in rows:
        acc = f"{r.acceptance_rate:.3f}" if r.acceptance_rate is not None else "-"
        print(f"{r.strategy:<10} {r.dtype:<9} {r.bytes_compared:>7} {r.flips:>6} {r.flips_per_10k:>10.2f} "
              f"{r.near_ties_per_10k:>14.2f} {acc:>7}")
    return 0


_DTYPES = ("bfloat16", "float16", "float32")


def _cmd_convert(args: argparse.Namespace) -> int:
    dst = Path(args.dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not args.overwrite:
        raise BLTDecodeError(f"{dst} exists and is not an empty directory; pass --overwrite to write into it")
    src_format = formats.detect_format(args.src)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = formats.load_checkpoint(args.src, dtype=dtype)
    formats.save_checkpoint(model, dst, args.to)
    n = sum(p.numel() for p in model.parameters())
    print(f"converted {args.src} ({src_format}) -> {dst} ({args.to}), {n:,} parameters in {str(model.dtype).removeprefix('torch.')}")
    return 0


def _cmd_trace(args: argparse.Namespace) -> int:
    from blt_decode import render

    traced = render.trace_generation(args.model, args.prompt, strategy=args.strategy,
                                     max_new_bytes=args.max_new_bytes, **parse_options(args.option))
    if args.format == "terminal":
        print(render.to_terminal(traced))
    if args.html:
        Path(args.html).write_text(render.to_html(traced), encoding="utf-8")
        print(f"wrote {args.html}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blt-decode", description="Fast decoding of Byte Latent Transformers.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate bytes after a prompt")
    gen.add_argument("prompt", help="prompt text (UTF-8)")
    gen.add_argument("--model", default="default", help="checkpoint directory, 'default', or random:PRESET[:SEED] (default: %(default)s)")
    gen.add_argument("--strategy", default="autoregressive", help="decoding strategy (see 'blt-decode strategies')")
    gen.add_argument("--backend", default="eager", help="compute backend (see 'blt-decode backends')")
    gen.add_argument("--max-new-bytes", type=int, default=api.DEFAULT_MAX_NEW_BYTES)
    gen.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE", help="strategy option (repeatable)")
    gen.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop after this text (repeatable)")
    gen.add_argument("--seed", type=int, default=None, help="seed for sampling strategies")
    gen.add_argument("--json", action="store_true", help="print output and statistics as one JSON object")
    gen.set_defaults(func=_cmd_generate)

    ex = sub.add_parser("exactness", help="count near-tie byte flips of a strategy vs greedy in low precision")
    ex.add_argument("--model", default="random:small")
    ex.add_argument("--strategy", default="blt-s")
    ex.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE")
    ex.add_argument("--dtype", action="append", choices=["float32", "bfloat16", "float64"], default=None)
    ex.add_argument("--prompts", type=int, default=20, help="number of stdlib prompts")
    ex.add_argument("--max-new-bytes", type=int, default=256)
    ex.set_defaults(func=_cmd_exactness)

    conv = sub.add_parser("convert", help="convert a checkpoint between the native, Hugging Face and original layouts")
    conv.add_argument("src", help="checkpoint directory (any layout blt-decode reads; recognised by its files)")
    conv.add_argument("dst", help="output directory")
    conv.add_argument("--to", required=True, choices=("native", "hf", "original"), help="layout to write")
    conv.add_argument("--dtype", choices=_DTYPES, default=None,
                      help="store the tensors in this dtype (default: float32)")
    conv.add_argument("--overwrite", action="store_true", help="write into a non-empty output directory")
    conv.set_defaults(func=_cmd_convert)

    tr = sub.add_parser("trace", help="show how a strategy decoded: patches, entropies, drafts, diffusion passes")
    tr.add_argument("prompt")
    tr.add_argument("--model", default="default")
    tr.add_argument("--strategy", default="autoregressive")
    tr.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE")
    tr.add_argument("--max-new-bytes", type=int, default=128)
    tr.add_argument("--html", metavar="PATH", help="write a self-contained HTML page")
    tr.add_argument("--format", choices=("terminal", "none"), default=None,
                    help="print a coloured terminal view (default: terminal unless --html is given)")
    tr.set_defaults(func=_cmd_trace)

    sub.add_parser("strategies", help="list registered decoding strategies").set_defaults(func=_cmd_strategies)
    sub.add_parser("backends", help="list registered compute backends").set_defaults(func=_cmd_backends)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "trace" and args.format is None:
        args.format = "none" if args.html else "terminal"
    try:
        return args.func(args)
    except (BLTDecodeError, KeyError) as exc:
        message = str(exc) if isinstance(exc, BLTDecodeError) else exc.args[0] if exc.args else repr(exc)
        print(f"blt-decode: error: {message}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
