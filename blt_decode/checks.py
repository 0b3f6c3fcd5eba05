"""The value checks behind every typed record: model configs (:mod:`blt_decode.config`), strategy
options (:mod:`blt_decode.options`) and training configs (:mod:`blt_decode.training.loop`).

What counts as an integer, which numbers convert to float, what "a finite number in a range" means and
how a refused value is shown are decided here, once; each record raises its own error type and names
its fields its own way (``option 'k'``, ``--lr``, ``encoder.dim``).
"""

from __future__ import annotations

import argparse
import math
import numbers
from typing import Any, Callable


def is_int(value: Any) -> bool:
    """A genuine integer: ``True``/``False`` are not counts or sizes (bool is an int subclass)."""
    return isinstance(value, int) and not isinstance(value, bool)


def to_int(value: Any) -> Any:
    """Converter: integer types (numpy's too) to int; anything else is left for the validator to refuse."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return value


def to_float(value: Any) -> Any:
    """Converter: real numbers (ints and numpy scalars too; JSON writes 10000.0 as 10000) to float, bools
    excluded; anything else is left for the validator to refuse."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an int beyond float range: left as is, refused as not finite
            return value
    return value


def finite_in_range(value: Any, low: float | None = None, high: float | None = None, *,
                    low_open: bool = False, high_open: bool = False) -> bool:
    """Is ``value`` a finite float within the bounds (``*_open`` excludes the bound)?"""
    if not isinstance(value, float) or not math.isfinite(value):
        return False
    if low is not None and not (value > low if low_open else value >= low):
        return False
    return high is None or (value < high if high_open else value <= high)


def show(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, so that a refused value cannot flood the message."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def int_argument(least: int, most: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: a decimal integer in ``least..most`` (no upper bound for None); anything else
    is argparse's one-line usage error, before any work starts."""
    allowed = f"an integer >= {least}" if most is None else f"an integer in {least}..{most}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}") from None
        if value < least or (most is not None and value > most):
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {value}")
        return value

    return parse
