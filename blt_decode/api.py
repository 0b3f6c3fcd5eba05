"""The public API: load a model, generate, stream, generate many at once, score."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator, Sequence

import attrs
import numpy as np
import torch
from tqdm import tqdm

from blt_decode.checkpoints.resolve import (  # noqa: F401 - re-exported: the public API's model loading lives there
    DEFAULT_MODEL_DIR,
    default_model_available,
    load_model,
    random_model,
    with_config,
)
from blt_decode.checks import is_int, show
from blt_decode.decoding.sampling import NEVER_GENERATED, greedy
from blt_decode.decoding.session import open_session
from blt_decode.decoding.stats import DecodeStats
from blt_decode.engine.core import Engine
from blt_decode.engine.driver import Committer, Generation, decode_request, utf8_text
from blt_decode.engine.request import DEFAULT_MAX_NEW_BYTES, Request, check_flag, prepare
from blt_decode.errors import InvalidRequestError
from blt_decode.model import tokenizer
from blt_decode.model.blt import BLTModel
from blt_decode.plugins import registry as plugins
from blt_decode.trace import Trace


# -- generation ---------------------------------------------------------------------------------------
class Stream:
    """Iterates over byte chunks as the strategy commits them; ``stats`` and ``output`` are set once the
    iteration ends (also when the consumer stops early). :meth:`text` gives the same output as text
    that never splits a UTF-8 character."""

    def __init__(self, model: str | Path | BLTModel, prompt: str | bytes, *, strategy: str = "autoregressive",
                 backend: str = "eager", max_new_bytes: int = DEFAULT_MAX_NEW_BYTES,
                 stop: str | bytes | Sequence[str | bytes] = (), seed: int | None = None, trace: bool = False,
                 **options: Any):
        # Everything that can fail on bad input fails here, before any decoding starts.
        self.backend = plugins.get_backend(backend)
        check_flag("trace", trace)
        request = Request(prompt, strategy=strategy, options=options, max_new_bytes=max_new_bytes, stop=stop, seed=seed)
        self.model = load_model(model)
        self.request = prepare(request, self.model.config.max_seqlen)
        self.strategy, self.options, self.prompt = self.request.strategy, self.request.options, self.request.prompt
        self.max_new_bytes, self.seed = self.request.max_new_bytes, self.request.seed
        self.output: bytes | None = None
        self.stats: DecodeStats | None = None
        self.trace: Trace | None = Trace() if trace else None
        self._started = False

    def __iter__(self) -> Iterator[bytes]:
        if self._started:
            raise RuntimeError("a Stream can be iterated once")
        self._started = True
        request = self.request
        session = open_session(self.backend, self.model, request.capacity)
        session.trace = self.trace
        committer = Committer(request)
        try:
            yield from decode_request(request, session, committer)
        finally:
            self.output = bytes(committer.out)
            self.stats = committer.stats(session.stats, self.model.param_counts(), session.closed_patches)

    def text(self) -> Iterator[str]:
        """The output as text, chunk by chunk, holding back a character split across chunks until it is
        whole (invalid UTF-8 becomes U+FFFD, as in :attr:`Generation.text`)."""
        return utf8_text(iter(self))


def stream(model: str | Path | BLTModel, prompt: str | bytes, **kwargs: Any) -> Stream:
    """Like :func:`generate`, but returns an iterator of byte chunks as they are committed
    (``.text()`` for whole characters)."""
    return Stream(model, prompt, **kwargs)


def generate(model: str | Path | BLTModel, prompt: str | bytes, *, strategy: str = "autoregressive",
             backend: str = "eager", max_new_bytes: int = DEFAULT_MAX_NEW_BYTES,
             stop: str | bytes | Sequence[str | bytes] = (), seed: int | None = None, trace: bool = False,
             **options: Any) -> Generation:
    """Generate up to ``max_new_bytes`` bytes after ``prompt`` with a strategy and backend chosen by name.

    Extra keyword arguments are the strategy's options (see ``blt-decode strategies``). Generation stops
    at EOS (not included), after a stop sequence (included; a str or bytes is one stop sequence, a list
    holds several), or at ``max_new_bytes``. Without a ``seed``, sampling strategies get one drawn from
    the operating system (global random state is never touched); the seed used is in ``stats.seed``
    (None when the decoding drew no random numbers, as greedy decoding does not).
    With ``trace=True`` the result carries the decoding events (:mod:`blt_decode.trace`). Bad arguments
    raise a :class:`~blt_decode.errors.BLTDecodeError` naming what is wrong before any decoding.
    """
    s = Stream(model, prompt, strategy=strategy, backend=backend, max_new_bytes=max_new_bytes, stop=stop,
               seed=seed, trace=trace, **options)
    chunks = list(s)
    assert s.stats is not None
    return Generation(output=b"".join(chunks), stats=s.stats, prompt=s.prompt, trace=s.trace)


def generate_many(model: str | Path | BLTModel, prompts: Sequence[str | bytes | Request], *,
                  strategy: str | None = None, backend: str = "eager", batch_size: int = 16,
                  max_new_bytes: int | None = None, stop: str | bytes | Sequence[str | bytes] | None = None,
                  seed: int | None = None, progress: bool = False, **options: Any) -> list[Generation]:
    """Generate for many prompts at once with the batched :class:`~blt_decode.engine.core.Engine`; returns one
    :class:`Generation` per prompt, in input order, each exactly what :func:`generate` gives for it alone.

    ``prompts`` is a list (or other sequence) of prompts, str or bytes: the keyword arguments ``strategy``
    (default autoregressive), ``max_new_bytes`` (default 256), ``stop``, ``seed`` and the strategy's
    options apply to each. It may also hold :class:`~blt_decode.engine.request.Request` objects, each with its
    own strategy, options, seed and limits; those keyword arguments are then refused (they would apply to
    some prompts and not to others), while ``backend``, ``batch_size`` and ``progress`` concern the whole
    call. A bare str or bytes is refused (it is one prompt, not a list of them). Every request is validated
    before any decoding starts. ``batch_size`` requests decode at a time (continuous batching: a finished
    request's slot goes to the next one at once). A request that fails raises its error after the others
    have finished."""
    if isinstance(prompts, (str, bytes, bytearray)):
        raise InvalidRequestError(f"prompts must be a list of prompts, got one {type(prompts).__name__} "
                                  f"({show(prompts, 40)}): write [prompt] to generate for it alone")
    if not isinstance(prompts, Sequence):
        raise InvalidRequestError(f"prompts must be a list of prompts (str or bytes) or Requests, got {type(prompts).__name__}")
    check_flag("progress", progress)
    per_call = {name: value for name, value in (("strategy", strategy), ("max_new_bytes", max_new_bytes),
                                                  ("stop", stop), ("seed", seed)) if value is not None}
    per_call.update(options)
    if per_call and any(isinstance(p, Request) for p in prompts):
        raise InvalidRequestError(
            f"generate_many got Request objects and call-level {', '.join(sorted(per_call))}: a Request carries its "
            "own strategy, options, limits and seed, so give them in each Request (or pass plain prompts)")
    model = load_model(model)
    requests = [p if isinstance(p, Request) else
                Request(p, strategy=strategy or "autoregressive", options=options,
                        max_new_bytes=DEFAULT_MAX_NEW_BYTES if max_new_bytes is None else max_new_bytes,
                        stop=() if stop is None else stop, seed=seed)
                for p in prompts]
    engine = Engine(model, backend=backend, max_batch=batch_size)
    for r in requests:  # validate every request before queueing any
        prepare(r, model.config.max_seqlen)
    streams = [engine.submit_request(r) for r in requests]
    with tqdm(total=len(streams), desc="generate", unit="req", disable=not progress) as bar:
        done = 0
        while not engine.idle:
            engine.step()
            now = sum(s.done for s in streams)
            bar.update(now - done)
            done = now
    for s in streams:
        if s.error is not None:
            raise s.error
    return [s.result() for s in streams]


# -- scoring ------------------------------------------------------------------------------------------
#: most alternatives per byte that :func:`score` reports (``top_logprobs``)
MAX_TOP_LOGPROBS = 20


@attrs.frozen
class Score:
    """What :func:`score` and :func:`score_many` return, per byte of the scored data."""

    logprobs: np.ndarray  #: natural-log probability of each byte given the bytes before it
    bits_per_byte: float
    #: was each byte what greedy decoding picks there (the most likely id that can be generated, ties to
    #: the lowest id, as :func:`blt_decode.decoding.sampling.greedy`)?
    greedy: np.ndarray
    #: with ``top_logprobs=N``: the N most likely token ids at each position ([bytes, N], best first; byte
    #: ids and EOS, never the ids nothing generates) and their log-probabilities; else None
    top_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None


def _check_top(top_logprobs: Any) -> int:
    if not is_int(top_logprobs) or not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidRequestError(f"top_logprobs must be an integer in 0..{MAX_TOP_LOGPROBS}, got {top_logprobs!r}")
    return top_logprobs


def _bits_per_byte(logprobs: np.ndarray) -> float:
    return float(-logprobs.sum() / math.log(2) / len(logprobs))


@torch.no_grad()
def _score_rows(model: BLTModel, rows: Sequence[bytes], top: int) -> list[Score]:
    """One reference forward over ``rows`` (each fits the model) padded on the right: the model is causal,
    so padding after a row changes none of its logits."""
    longest = max(len(r) for r in rows) + 1
    ids = torch.full((len(rows), longest), tokenizer.PAD_ID, dtype=torch.long, device=model.device)
    for i, raw in enumerate(rows):
        ids[i, : len(raw) + 1] = torch.tensor(tokenizer.encode(raw))
    logits = model(ids).double()
    logp = torch.log_softmax(logits, dim=-1)[:, :-1]
    targets = ids[:, 1:]
    picked = logp.gather(-1, targets[..., None])[..., 0].cpu().numpy()
    is_greedy = (greedy(logits[:, :-1]) == targets).cpu().numpy()
    if top:
        candidates = logp.clone()
        candidates[..., list(NEVER_GENERATED)] = float("-inf")
        # a stable sort ranks exactly tied ids lowest first, as greedy breaks ties
        top_values, top_index = torch.sort(candidates, dim=-1, descending=True, stable=True)
        top_values, top_index = top_values[..., :top].cpu().numpy(), top_index[..., :top].cpu().numpy()
    out = []
    for i, raw in enumerate(rows):
        n = len(raw)
        out.append(Score(logprobs=picked[i, :n], bits_per_byte=_bits_per_byte(picked[i, :n]), greedy=is_greedy[i, :n],
                         top_ids=top_index[i, :n] if top else None, top_logprobs=top_values[i, :n] if top else None))
    return out


def score_many(model: str | Path | BLTModel, data: Sequence[str | bytes], *, batch_size: int = 8,
               top_logprobs: int = 0, progress: bool = False) -> list[Score]:
    """:func:`score` for many texts at once: one :class:`Score` per text, in input order, each text a
    sequence of its own (BOS, then its bytes; at most ``max_seqlen - 1`` bytes). ``batch_size`` texts go
    through one forward pass (texts of similar length together); the results equal scoring each alone
    (up to the rounding of batched arithmetic)."""
    model = load_model(model)
    if not is_int(batch_size) or batch_size < 1:
        raise InvalidRequestError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    top = _check_top(top_logprobs)
    limit = model.config.max_seqlen - 1
    raws = []
    for i, text in enumerate(data):
        try:
            raw = tokenizer.to_bytes(text)
        except InvalidRequestError as exc:
            raise InvalidRequestError(f"text {i}: {exc}") from None
        if not 0 < len(raw) <= limit:
            raise InvalidRequestError(f"text {i} has {len(raw)} bytes; score takes 1..{limit} bytes per text "
                                      "(the model's max_seqlen - 1)")
        raws.append(raw)
    order = sorted(range(len(raws)), key=lambda i: -len(raws[i]))
    results: list[Score | None] = [None] * len(raws)
    with tqdm(total=len(raws), desc="score", unit="text", disable=not progress) as bar:
        for lo in range(0, len(order), batch_size):
            batch = order[lo : lo + batch_size]
            for i, s in zip(batch, _score_rows(model, [raws[i] for i in batch], top)):
                results[i] = s
            bar.update(len(batch))
    return results  # type: ignore[return-value]


def score(model: str | Path | BLTModel, data: str | bytes, *, chunk_bytes: int | None = None,
          top_logprobs: int = 0, batch_size: int = 8) -> Score:
    """Per-byte log-probabilities and bits-per-byte of ``data`` under the model, whether each byte is the
    greedy choice, and with ``top_logprobs=N`` the N most likely ids at each position.

    One full forward per chunk of at most ``chunk_bytes`` bytes (default: the model's max_seqlen - 1),
    ``batch_size`` chunks at a time; each chunk starts a fresh sequence with BOS, so chunks do not see
    each other.
    """
    model = load_model(model)
    raw = tokenizer.to_bytes(data)
    if not raw:
        raise InvalidRequestError("score needs at least one byte")
    chunk = model.config.max_seqlen - 1 if chunk_bytes is None else chunk_bytes
    if not is_int(chunk) or not 0 < chunk < model.config.max_seqlen:
        raise InvalidRequestError(f"chunk_bytes must be an integer in 1..{model.config.max_seqlen - 1}, got {chunk!r}")
    parts = score_many(model, [raw[lo : lo + chunk] for lo in range(0, len(raw), chunk)], batch_size=batch_size,
                       top_logprobs=top_logprobs)
    if len(parts) == 1:
        return parts[0]
    logprobs = np.concatenate([p.logprobs for p in parts])
    top = parts[0].top_ids is not None
    return Score(logprobs=logprobs, bits_per_byte=_bits_per_byte(logprobs),
                 greedy=np.concatenate([p.greedy for p in parts]),
                 top_ids=np.concatenate([p.top_ids for p in parts]) if top else None,
                 top_logprobs=np.concatenate([p.top_logprobs for p in parts]) if top else None)
