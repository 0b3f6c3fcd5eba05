"""A generation request and its validation: the one place that checks what a caller asks for (see
docs/api.md)."""

from __future__ import annotations

import secrets
from typing import Any, Mapping, Sequence

import attrs

from blt_decode.checks import MAX_SEED, is_int, show
from blt_decode.decoding import options as options_mod
from blt_decode.errors import InvalidRequestError, PromptTooLongError, StrategyError
from blt_decode.model import tokenizer
from blt_decode.plugins import registry as plugins

#: new bytes generated when a caller does not say
DEFAULT_MAX_NEW_BYTES = 256
#: most stop sequences in one request, and most bytes in one (OpenAI allows 4; a stop list is matched in
#: time linear in the output whatever its size, but building its matcher is linear in its total length)
MAX_STOP_SEQUENCES = 32
MAX_STOP_BYTES = 256
#: most positions a strategy may write past the committed sequence (drafts, blocks; the built-in ones
#: write at most 65)
MAX_LOOKAHEAD = 1 << 16


@attrs.frozen
class Request:
    """One generation: ``prompt`` (str as UTF-8, or raw bytes), a strategy by name with its options,
    ``max_new_bytes``, stop sequences (a str/bytes is *one* stop sequence) and a seed for sampling
    strategies (None draws one from a private source; the seed used is in the statistics)."""

    prompt: str | bytes
    strategy: str = "autoregressive"
    options: Mapping[str, Any] = attrs.field(factory=dict)
    max_new_bytes: int = DEFAULT_MAX_NEW_BYTES
    stop: str | bytes | Sequence[str | bytes] = ()
    seed: int | None = None


@attrs.frozen
class PreparedRequest:
    """A validated request: the strategy object, its Options instance, the prompt's bytes and ids."""

    strategy: Any
    options: Any
    prompt: bytes
    prompt_ids: tuple[int, ...]
    max_new_bytes: int
    stops: tuple[bytes, ...]
    seed: int
    #: the strategy's scratch room past the committed sequence, ``strategy.lookahead(options)``
    lookahead: int

    @property
    def capacity(self) -> int:
        """Session positions the request may use: BOS + prompt + new bytes + the strategy's scratch room."""
        return len(self.prompt_ids) + self.max_new_bytes + self.lookahead + 1


def prompt_bytes(prompt: Any) -> bytes:
    """A prompt as bytes (str as UTF-8), or :class:`InvalidRequestError` naming the prompt."""
    try:
        return tokenizer.to_bytes(prompt)
    except InvalidRequestError as exc:
        raise InvalidRequestError(f"prompt: {exc}") from None


def stop_sequences(stop: Any) -> tuple[bytes, ...]:
    """Stop sequences as bytes: a single str/bytes is one sequence, a list/tuple holds several."""
    if isinstance(stop, (str, bytes, bytearray)):
        stop = [stop]
    if not isinstance(stop, (list, tuple)):
        raise InvalidRequestError(f"stop must be a str, bytes, or a list of them, got {type(stop).__name__}")
    if len(stop) > MAX_STOP_SEQUENCES:
        raise InvalidRequestError(f"stop holds {len(stop)} sequences; at most {MAX_STOP_SEQUENCES} are allowed")
    out = []
    for index, s in enumerate(stop):
        if not isinstance(s, (str, bytes, bytearray)):
            raise InvalidRequestError(f"each stop sequence must be str or bytes, got {type(s).__name__}: {show(s)}")
        data = tokenizer.to_bytes(s)
        if not data:
            raise InvalidRequestError("stop sequences must not be empty")
        if len(data) > MAX_STOP_BYTES:
            raise InvalidRequestError(f"stop sequence {index} is {len(data)} bytes long; at most {MAX_STOP_BYTES} bytes are allowed")
        out.append(data)
    return tuple(out)


def check_max_new_bytes(value: Any) -> int:
    """``value`` if it is a valid ``max_new_bytes`` (an int >= 0, not a bool), else InvalidRequestError."""
    if not is_int(value) or value < 0:
        raise InvalidRequestError(f"max_new_bytes must be an integer >= 0, got {value!r}")
    return value


def check_flag(name: str, value: Any) -> bool:
    """``value`` if it is True or False (not 1, "yes" or None), else InvalidRequestError naming ``name``."""
    if not isinstance(value, bool):
        raise InvalidRequestError(f"{name} must be True or False, got {show(value)}")
    return value


def check_seed(value: Any) -> int:
    """The seed to use: ``value`` when given (an integer in 0..2**64-1), else one drawn from the operating
    system's random source (never from, and never touching, torch's or Python's global random state)."""
    if value is None:
        return secrets.randbits(31)
    if not is_int(value) or not 0 <= value <= MAX_SEED:
        raise InvalidRequestError(f"seed must be an integer in 0..2**64-1, got {value!r}")
    return value


def prepare(request: Request, max_seqlen: int) -> PreparedRequest:
    """Validate ``request`` for a model whose longest sequence is ``max_seqlen`` positions."""
    strategy = plugins.get_strategy(request.strategy)
    if not isinstance(request.options, Mapping):
        raise InvalidRequestError(f"options must be a mapping of option names to values, got {type(request.options).__name__}")
    opts = options_mod.make_options(strategy, dict(request.options))
    prompt = prompt_bytes(request.prompt)
    max_new = check_max_new_bytes(request.max_new_bytes)
    if max_new > max_seqlen - 1:  # more than any prompt leaves room for: name max_new_bytes, not the prompt
        raise InvalidRequestError(f"max_new_bytes={max_new} exceeds the model's limit: at most {max_seqlen - 1} new "
                                  f"bytes (max_seqlen {max_seqlen} positions, BOS included), fewer after a prompt")
    if len(prompt) + 1 + max_new > max_seqlen:
        raise PromptTooLongError(
            f"prompt of {len(prompt)} bytes + BOS + max_new_bytes={max_new} exceeds the model's limit of "
            f"{max_seqlen} positions (at most {max(max_seqlen - 1 - max_new, 0)} prompt bytes with this max_new_bytes)"
        )
    return PreparedRequest(
        strategy=strategy, options=opts, prompt=prompt, prompt_ids=tuple(tokenizer.encode(prompt)),
        max_new_bytes=max_new, stops=stop_sequences(request.stop), seed=check_seed(request.seed),
        lookahead=strategy_lookahead(strategy, opts),
    )


def strategy_lookahead(strategy: Any, options: Any) -> int:
    """``strategy.lookahead(options)``, which sizes the session (and the engine's slots), checked: an
    integer in 0..:data:`MAX_LOOKAHEAD`, else a :class:`~blt_decode.errors.StrategyError` naming the
    strategy (the memory the room takes is checked where it is allocated)."""
    room = strategy.lookahead(options)
    if not is_int(room) or not 0 <= room <= MAX_LOOKAHEAD:
        raise StrategyError(f"strategy {strategy.name!r}: lookahead(options) returned {show(room)}; it must be an "
                            f"integer in 0..{MAX_LOOKAHEAD}, the positions it writes past the committed sequence")
    return room
