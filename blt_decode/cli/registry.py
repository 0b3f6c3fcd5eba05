"""``blt-decode strategies``, ``backends`` and ``new-strategy``: what the plugin registry holds, and a new
strategy's plugin package to start from."""

from __future__ import annotations

import argparse
from pathlib import Path

import attrs

from blt_decode.plugins import registry as plugins
from blt_decode.tools import scaffold


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """``blt-decode strategies``, ``backends`` and ``new-strategy``."""
    for add in (_add_strategies_parser, _add_backends_parser, _add_new_strategy_parser):
        add(sub)


def _print_table(rows: list[tuple[str, str]]) -> None:
    width = max((len(a) for a, _ in rows), default=0)
    for name, text in rows:
        print(f"{name:<{width}}  {text}")


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
    directory = scaffold.new_strategy(args.name, Path(args.dir) if args.dir else None)
    print(f"wrote the plugin package of strategy {args.name!r} to {directory}; next:\n"
          f"  cd {directory} && pip install -e \".[test]\" && python -m pytest\n"
          f"  blt-decode generate --model random:tiny --strategy {args.name} \"hello\"")
    return 0
