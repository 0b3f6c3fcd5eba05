"""Strategy options: the option fields (:func:`integer`, :func:`number`, :func:`choice`, :func:`flag`,
one-line errors naming the option), building a strategy's Options from keyword arguments, and parsing
option strings (``-o key=value``, ``bench``'s ``name:key=value``) by each option's *declared* type
(``Literal["kv", "none"]`` keeps ``"none"`` a string; ``int | None`` turns it into None).
"""

from __future__ import annotations

import types
import typing
from typing import Any, Iterable, Literal, Sequence, Union

import attrs

from blt_decode.checks import Validators, to_float
from blt_decode.errors import InvalidOptionsError


# -- field helpers ------------------------------------------------------------------------------------
#: the strategy options' family of checks (blt_decode.checks): "option 'k' must be ..., got ..."
CHECKS = Validators(InvalidOptionsError, label=lambda attribute: f"option {attribute.name!r}")


def integer(default: int | None, *, minimum: int | None = None, maximum: int | None = None,
            optional: bool = False, also: tuple[str, ...] = ()) -> Any:
    """An integer option in ``minimum..maximum``; ``optional`` also allows None, ``also`` names string
    values accepted besides integers (e.g. ``("auto",)``)."""
    return attrs.field(default=default, validator=CHECKS.integer(minimum, maximum, optional=optional, also=also))


def number(default: float | None, *, minimum: float | None = None, maximum: float | None = None,
           minimum_open: bool = False, maximum_open: bool = False, optional: bool = False) -> Any:
    """A finite float option within the bounds (``*_open`` excludes the bound); ``optional`` allows None."""
    return attrs.field(default=default, converter=to_float, validator=CHECKS.number(
        minimum, maximum, low_open=minimum_open, high_open=maximum_open, optional=optional))


def choice(default: str, choices: Sequence[str]) -> Any:
    """A string option, one of ``choices``."""
    return attrs.field(default=default, validator=CHECKS.choice(choices))


def flag(default: bool) -> Any:
    """A boolean option (True or False, nothing else)."""
    return attrs.field(default=default, validator=CHECKS.flag())


# -- building Options ---------------------------------------------------------------------------------
def _clean_message(exc: BaseException) -> str:
    """One line from a validator's exception: attrs' own validators raise TypeError(msg, Attribute, ...)
    whose str() is a tuple dump; keep the message only."""
    if exc.args and isinstance(exc.args[0], str):
        return exc.args[0].splitlines()[0] if exc.args[0] else type(exc).__name__
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def make_options(strategy: Any, options: dict[str, Any]) -> Any:
    """The strategy's Options from keyword arguments, with errors that name the strategy, the option and
    what it accepts."""
    fields = {f.name: f for f in attrs.fields(strategy.Options)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        valid = ", ".join(sorted(fields)) or "(none)"
        raise InvalidOptionsError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for strategy {strategy.name!r}; valid options: {valid}"
        )
    try:
        return strategy.Options(**options)
    except (InvalidOptionsError, TypeError, ValueError, OverflowError) as exc:
        raise InvalidOptionsError(f"strategy {strategy.name!r}: {_clean_message(exc)}") from None


# -- parsing option strings by declared type ----------------------------------------------------------
def option_types(options_class: type) -> dict[str, Any]:
    """Declared type of every option (resolving string annotations); the default's type where a field
    has no annotation."""
    try:
        hints = typing.get_type_hints(options_class, include_extras=False)
    except Exception:  # a third-party annotation that cannot be resolved: fall back to defaults
        hints = {}
    out = {}
    for f in attrs.fields(options_class):
        declared = hints.get(f.name, f.type if not isinstance(f.type, str) else None)
        if declared is None:
            default = f.default if not isinstance(f.default, attrs.Factory) else None  # type: ignore[arg-type]
            declared = type(default) if default is not None else Any
        out[f.name] = declared
    return out


_NONE_WORDS = ("none", "null")
_TRUE_WORDS = ("true", "yes", "on", "1")
_FALSE_WORDS = ("false", "no", "off", "0")


def _members(tp: Any) -> list[Any]:
    origin = typing.get_origin(tp)
    if origin is Union or (hasattr(types, "UnionType") and origin is getattr(types, "UnionType")):
        return [m for arg in typing.get_args(tp) for m in _members(arg)]
    return [tp]


def _describe(members: Iterable[Any]) -> str:
    words = []
    for m in members:
        if m is type(None):
            words.append("none")
        elif typing.get_origin(m) is Literal:
            words.extend(repr(v) for v in typing.get_args(m))
        elif m is bool:
            words.append("true/false")
        elif m is int:
            words.append("an integer")
        elif m is float:
            words.append("a number")
        elif m is str:
            words.append("a string")
        else:
            words.append(getattr(m, "__name__", str(m)))
    return " or ".join(words)


def parse_value(text: str, declared: Any) -> Any:
    """Turn an option string into a value of the declared type; raises ValueError naming what is allowed."""
    if declared is Any:
        return _guess(text)
    members = _members(declared)
    stripped = text.strip()
    lowered = stripped.lower()
    # exact literals first (so Literal["kv", "none"] keeps "none" a string), then None, then scalars
    for m in members:
        if typing.get_origin(m) is Literal:
            for v in typing.get_args(m):
                if isinstance(v, str) and v == stripped:
                    return v
                if not isinstance(v, str) and str(v).lower() == lowered:
                    return v
    if type(None) in members and lowered in _NONE_WORDS:
        return None
    for m in members:
        if m is bool:
            if lowered in _TRUE_WORDS:
                return True
            if lowered in _FALSE_WORDS:
                return False
        elif m is int:
            try:
                return int(stripped, 10)
            except ValueError:
                pass
        elif m is float:
            try:
                return float(stripped)
            except ValueError:
                pass
    if str in members:
        return text
    raise ValueError(f"expects {_describe(members)}, got {text!r}")


def _guess(text: str) -> Any:
    # only for options whose type cannot be known (no annotation, no default)
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in _NONE_WORDS:
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_option_strings(strategy: Any, pairs: Sequence[str], *, separator: str = "=") -> dict[str, Any]:
    """``["k=8", "temperature=0.7"]`` → ``{"k": 8, "temperature": 0.7}`` using the strategy's declared
    option types. Unknown keys are kept (as strings) so that :func:`make_options` reports them with the
    list of valid options; malformed pairs, a key given twice and unparsable values raise
    :class:`InvalidOptionsError`."""
    declared = option_types(strategy.Options)
    out: dict[str, Any] = {}
    given: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition(separator)
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise InvalidOptionsError(f"option {pair!r} of strategy {strategy.name!r} is not key{separator}value")
        if key in given:  # taking the last one silently would hide a typo or a conflict
            raise InvalidOptionsError(f"option {key!r} of strategy {strategy.name!r} is given twice ({given[key]!r}, "
                                      f"{pair!r}); give it once")
        given[key] = pair
        if key not in declared:
            out[key] = value
            continue
        try:
            out[key] = parse_value(value, declared[key])
        except ValueError as exc:
            raise InvalidOptionsError(f"strategy {strategy.name!r}: option {key!r} {exc}") from None
    return out
