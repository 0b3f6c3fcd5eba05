"""The value checks behind every typed record: model configs (:mod:`blt_decode.model.config`), strategy
options (:mod:`blt_decode.decoding.options`) and training configs (:mod:`blt_decode.training`).

What counts as an integer, which numbers convert to float, what "a finite number in a range" means, how
a refused value is shown, and the one family of attrs validators built on them (:class:`Validators`) are
decided here, once; each record raises its own error type and names its fields its own way
(``option 'k'``, ``--lr``, ``dim``).
"""

from __future__ import annotations

import argparse
import json
import math
import numbers
import os
import stat
from typing import Any, Callable, Sequence

import attrs

#: seeds accepted by torch.Generator.manual_seed (a model's, a request's, a harness's)
MAX_SEED = 2**64 - 1

#: an attrs validator: ``check(instance, attribute, value)`` raises on a refused value
Validator = Callable[[Any, "attrs.Attribute", Any], None]


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


def number_argument(low: float | None = None, high: float | None = None, *, low_open: bool = False,
                    high_open: bool = False) -> Callable[[str], float]:
    """An argparse ``type``: a finite number within the bounds (``nan`` and ``inf`` refused), else argparse's
    one-line usage error naming the allowed range."""
    allowed = describe_number(low, high, low_open=low_open, high_open=high_open)

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = None
        if value is None or not finite_in_range(value, low, high, low_open=low_open, high_open=high_open):
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}")
        return value

    return parse


def max_threads() -> int:
    """The most torch CPU threads a caller may ask for: the CPUs of this machine (``os.cpu_count()``).
    More never helps (decoding wants fewer, training all cores), and an absurd count (``--threads
    100000``) crashed the process in OpenMP's thread creation (exit 139) instead of being refused."""
    return max(os.cpu_count() or 1, 1)


def threads_argument(text: str) -> int:
    """An argparse ``type`` for ``--threads``: 0 (torch's default) up to :func:`max_threads`."""
    return int_argument(0, max_threads())(text)


def loads_json(text: str | bytes) -> Any:
    """``json.loads``, with every way a hostile text can fail it as one ``ValueError`` whose message is a
    line: malformed JSON, an integer longer than Python's digit limit (a ValueError of its own), and
    nesting deeper than the interpreter's recursion limit (``[[[[...`` raises RecursionError)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise ValueError("not valid JSON (nested too deeply)") from None
    except UnicodeDecodeError:  # bytes given
        raise ValueError("not UTF-8 text") from None
    except ValueError:  # the only other: an integer literal longer than Python's int digit limit
        raise ValueError("not valid JSON (an integer of more digits than Python converts)") from None


def file_kind(mode: int) -> str:
    """What a non-regular file is, in words (for messages refusing it): ``a pipe``, ``a character device``..."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a pipe"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _bound(number: int) -> str:
    # the largest seed is easier to read as a power of two than as 19 digits
    return "2**63-1" if number == 2**63 - 1 else str(number)


def describe_integer(least: int | None, most: int | None) -> str:
    """``an integer in 1..64``, ``an integer >= 0``, ``an integer <= 9`` or ``an integer``."""
    if least is not None and most is not None:
        return f"an integer in {least}..{_bound(most)}"
    if least is not None:
        return f"an integer >= {least}"
    return f"an integer <= {_bound(most)}" if most is not None else "an integer"


def describe_number(low: float | None, high: float | None, *, low_open: bool = False, high_open: bool = False) -> str:
    """``a number in [0, 1)``, ``a finite number > 0``, ``a finite number`` (an interval implies finite)."""
    if low is not None and high is not None:
        return f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"a finite number {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"a finite number {'<' if high_open else '<='} {high:g}"
    return "a finite number"


def _by_name(attribute: attrs.Attribute) -> str:
    return attribute.name


@attrs.frozen
class Validators:
    """The attrs validators of one family of records. A refused value raises ``error`` with the one line
    ``LABEL must be ALLOWED, got VALUE``; the family decides how a field is named (``label``, from its
    attrs attribute), how an allowed None is said (``optional``) and how the booleans are spelled.

    ``Validators(InvalidOptionsError, label=lambda a: f"option {a.name!r}").integer(1, 64)`` checks an
    option; each factory also takes a ``label`` of its own for one field."""

    error: type[Exception]
    label: Callable[[attrs.Attribute], str] = _by_name
    #: appended to what is allowed when None is allowed too
    optional: str = " or None"
    booleans: str = "True or False"

    def _refuse(self, label: str | None, attribute: attrs.Attribute, allowed: str, value: Any) -> Exception:
        return self.error(f"{label or self.label(attribute)} must be {allowed}, got {show(value)}")

    def integer(self, least: int | None = None, most: int | None = None, *, optional: bool = False,
                also: Sequence[str] = (), label: str | None = None) -> Validator:
        """An int (never a bool) in ``least..most`` (None: unbounded); ``also``: strings accepted besides
        (``("auto",)``); ``optional``: None too."""
        allowed = describe_integer(least, most) + "".join(f" or {v!r}" for v in also) + (self.optional if optional else "")

        def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
            if value is None and optional or isinstance(value, str) and value in also:
                return
            if not is_int(value) or (least is not None and value < least) or (most is not None and value > most):
                raise self._refuse(label, attribute, allowed, value)

        return check

    def number(self, low: float | None = None, high: float | None = None, *, low_open: bool = False,
               high_open: bool = False, optional: bool = False, label: str | None = None) -> Validator:
        """A finite float within the bounds (``*_open`` excludes the bound); pair it with the converter
        :func:`to_float`, which makes ints floats; ``optional``: None too."""
        allowed = describe_number(low, high, low_open=low_open, high_open=high_open) + (self.optional if optional else "")

        def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
            if value is None and optional:
                return
            if not finite_in_range(value, low, high, low_open=low_open, high_open=high_open):
                raise self._refuse(label, attribute, allowed, value)

        return check

    def choice(self, choices: Sequence[str], *, label: str | None = None) -> Validator:
        """One of the strings ``choices``."""
        allowed = "one of " + ", ".join(map(repr, choices))

        def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
            if not isinstance(value, str) or value not in choices:
                raise self._refuse(label, attribute, allowed, value)

        return check

    def flag(self, *, optional: bool = False, label: str | None = None) -> Validator:
        """``True`` or ``False`` (not 0/1, not a string); ``optional``: None too."""
        allowed = self.booleans + (self.optional if optional else "")

        def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
            if not isinstance(value, bool) and not (optional and value is None):
                raise self._refuse(label, attribute, allowed, value)

        return check
