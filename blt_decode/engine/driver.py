"""The framework's side of the decoding protocol for one request: check what the strategy commits, apply
EOS, stop sequences and ``max_new_bytes``, time it, and freeze the statistics.

A strategy's ``decode`` generator yields chunks of token ids. :class:`Committer` is the one place that
turns them into output bytes; :class:`blt_decode.Stream` (one sequence) and the batched
:class:`~blt_decode.engine.core.Engine` both use it, so a request ends the same way whoever runs it.
"""

from __future__ import annotations

import codecs
import operator
import time
from typing import Any, Iterable, Iterator

import attrs
import torch

from blt_decode.decoding.protocol import DecodeContext
from blt_decode.decoding.stats import DecodeStats, StatsRecorder
from blt_decode.decoding.stops import StopMatcher
from blt_decode.engine.request import PreparedRequest
from blt_decode.errors import StrategyError
from blt_decode.model import tokenizer
from blt_decode.trace import Committed, Trace

@attrs.frozen
class Generation:
    """One finished generation: the new bytes (``.text`` for text), its statistics, the prompt, and the
    trace when asked for."""

    output: bytes
    stats: DecodeStats
    prompt: bytes
    trace: Trace | None = None  #: decoding events, with generate(..., trace=True)

    @property
    def text(self) -> str:
        """The output decoded leniently for display (invalid UTF-8 becomes U+FFFD)."""
        return tokenizer.display(self.output)


#: a strategy that yields this many empty chunks in a row is stopped: it is not making progress
MAX_EMPTY_CHUNKS = 64


def _token(strategy: str, value: Any) -> int:
    # bool is an int subclass and would read as byte id 0/1; floats and strings are never ids
    if isinstance(value, bool):
        raise StrategyError(f"strategy {strategy!r} committed {value!r}; a chunk holds int token ids")
    try:
        token = operator.index(value)
    except TypeError:
        raise StrategyError(
            f"strategy {strategy!r} committed {value!r} ({type(value).__name__}); a chunk holds int token ids"
        ) from None
    if token != tokenizer.EOS_ID and not tokenizer.is_byte(token):
        raise StrategyError(
            f"strategy {strategy!r} committed the id {token}; allowed are byte ids "
            f"{tokenizer.OFFSET}..{tokenizer.VOCAB_SIZE - 1} and EOS ({tokenizer.EOS_ID})"
        )
    return token


def check_chunk(strategy: str, chunk: Any) -> list[int]:
    """The ids of one committed chunk, or :class:`StrategyError` naming the strategy: a chunk is a list
    or tuple of int token ids (byte ids or EOS). Bytes objects are refused: their items are byte
    values, not token ids (``b"A"`` would commit id 65, the byte 61)."""
    if not isinstance(chunk, (list, tuple, range)):
        hint = " (bytes hold byte values, not token ids: use tokenizer.encode(..., add_bos=False))" \
            if isinstance(chunk, (bytes, bytearray)) else ""
        raise StrategyError(
            f"strategy {strategy!r} yielded {chunk!r} ({type(chunk).__name__}); it must yield a list of int token ids{hint}"
        )
    return [_token(strategy, v) for v in chunk]


class Committer:
    """Output bytes, stop reason and timing of one request, fed chunk by chunk."""

    def __init__(self, request: PreparedRequest):
        self.request = request
        self.out = bytearray()
        self.tokens = 0
        self.reason: str | None = "max_new_bytes" if request.max_new_bytes == 0 else None
        self.started = time.perf_counter()
        self.first_byte_at: float | None = None
        self.first_chunk_bytes = 0
        self._empty = 0
        self._stops = StopMatcher(request.stops)
        self.drew_random = False  #: did the strategy draw from the request's seeded generator?

    @property
    def done(self) -> bool:
        """Has the request ended (EOS, a stop sequence, max_new_bytes, or the strategy's end)?"""
        return self.reason is not None

    def commit(self, chunk: Any) -> tuple[bytes, Committed]:
        """Apply one chunk; returns the new bytes (possibly empty) and the trace event of what was kept.
        Sets :attr:`reason` when the request ends (EOS, a stop sequence, max_new_bytes)."""
        name = self.request.strategy.name
        ids = check_chunk(name, chunk)
        if not ids:
            self._empty += 1
            if self._empty >= MAX_EMPTY_CHUNKS:
                raise StrategyError(f"strategy {name!r} committed nothing in {MAX_EMPTY_CHUNKS} chunks in a row; stopped")
        else:
            self._empty = 0
        position = len(self.request.prompt_ids) + self.tokens
        fresh = bytearray()
        kept = 0
        for token in ids:
            kept += 1
            self.tokens += 1
            if token == tokenizer.EOS_ID:
                self.reason = "eos"
                break
            byte = token - tokenizer.OFFSET
            fresh.append(byte)
            self.out.append(byte)
            self._stops.feed((byte,))
            if self._stops.ended:
                self.reason = "stop_sequence"
                break
            if len(self.out) == self.request.max_new_bytes:
                self.reason = "max_new_bytes"
                break
        if fresh and self.first_byte_at is None:
            self.first_byte_at = time.perf_counter()
            self.first_chunk_bytes = len(fresh)
        return bytes(fresh), Committed(position, tuple(ids[:kept]))

    def exhausted(self) -> None:
        """The strategy's generator ended on its own."""
        if self.reason is None:
            self.reason = "exhausted"

    def stats(self, recorder: StatsRecorder, params: Any, patches: int) -> DecodeStats:
        """Freeze the statistics (``stop_reason`` is "interrupted" when the consumer stopped early)."""
        end = time.perf_counter()
        ttfb = decode_rate = None
        if self.first_byte_at is not None:
            ttfb = self.first_byte_at - self.started
            after_first = len(self.out) - self.first_chunk_bytes
            if after_first and end > self.first_byte_at:
                decode_rate = after_first / (end - self.first_byte_at)
        return DecodeStats(
            passes=recorder.forward_passes(), params=params, prompt_bytes=len(self.request.prompt),
            new_bytes=len(self.out), new_tokens=self.tokens, patches=patches, wall_time_s=end - self.started,
            stop_reason=self.reason or "interrupted", seed=self.request.seed if self.drew_random else None,
            time_to_first_byte_s=ttfb, decode_bytes_per_second=decode_rate, **recorder.strategy_counters(),
        )


def decode_request(request: PreparedRequest, session: Any, committer: Committer) -> Iterator[bytes]:
    """The framework's loop over one request's strategy: run ``decode`` on ``session``, check and commit
    what it yields, stop at EOS, a stop sequence or ``max_new_bytes``, and yield the new bytes of each
    chunk. The strategy's generator is always closed. Used by :class:`blt_decode.Stream` (one sequence)
    and by the engine (each request in its own greenlet)."""
    generator = torch.Generator().manual_seed(request.seed)
    untouched = generator.get_state()
    context = DecodeContext(request.prompt_ids, request.max_new_bytes, generator)
    if hasattr(session, "strategy_name"):  # a third-party backend's session may not name strategies
        session.strategy_name = request.strategy.name
    decoder = None if committer.done else request.strategy.decode(session, context, request.options)
    try:
        while not committer.done:
            try:
                chunk = next(decoder)
            except StopIteration:
                committer.exhausted()
                break
            fresh, event = committer.commit(chunk)
            session.emit(event)
            if fresh:
                yield fresh
    finally:
        if decoder is not None:
            decoder.close()
        # the seed is reported only when it mattered: greedy decoding draws nothing
        committer.drew_random = not torch.equal(generator.get_state(), untouched)


def utf8_text(chunks: Iterable[bytes]) -> Iterator[str]:
    """Text from byte chunks, yielding only whole characters: a character split across chunks is held
    back until its last byte arrives; invalid UTF-8 becomes U+FFFD (as :func:`tokenizer.display`)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for chunk in chunks:
        text = decoder.decode(chunk)
        if text:
            yield text
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail
