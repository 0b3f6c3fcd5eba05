"""Choosing a byte from logits, in one place so that every strategy breaks ties, masks special ids and
filters distributions alike: :func:`probabilities` is the one transform (greedy, temperature, top-k,
top-p), :class:`SamplingOptions` the shared options and :class:`Sampler` the transform they define.
Every random draw goes through :func:`categorical` or :func:`bernoulli` with the request's seeded
generator (:mod:`blt_decode.testing` replaces those two to enumerate a sampler's branches).
"""

from __future__ import annotations

import attrs
import torch

from blt_decode.decoding import options
from blt_decode.model.tokenizer import BOE_ID, BOS_ID, PAD_ID

#: ids a generator never emits (EOS stays allowed: it ends the generation)
NEVER_GENERATED = (BOE_ID, BOS_ID, PAD_ID)


def mask_special(logits: torch.Tensor) -> torch.Tensor:
    """A copy of ``logits`` with the :data:`NEVER_GENERATED` ids at -inf over the last axis (EOS stays)."""
    out = logits.clone()
    out[..., list(NEVER_GENERATED)] = float("-inf")
    return out


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """Greedy ids over the last axis (ties go to the lowest id)."""
    return mask_special(logits).argmax(dim=-1)


def greedy_id(logits: torch.Tensor) -> int:
    """The greedy id of one row of logits ([V]) as a Python int."""
    return int(greedy(logits))


def probabilities(logits: torch.Tensor, *, temperature: float, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """The distribution (float64, over the last axis) that sampling with these options draws from.

    Temperature 0 is greedy: a one-hot vector at :func:`greedy`'s choice. Otherwise special ids other
    than EOS are masked, scores are divided by ``temperature``, then ``top_k`` keeps the k best scores
    (ties at the k-th score are all kept) and ``top_p`` keeps the smallest set of best-ranked ids whose
    mass reaches ``top_p`` (an id is dropped when the ids ranked before it already hold ``top_p``; among
    exactly tied scores the lower ids rank first).
    Works on a single row [V] or a batch [..., V]."""
    if temperature == 0:
        return torch.nn.functional.one_hot(greedy(logits), logits.shape[-1]).to(torch.float64)
    scores = mask_special(logits.to(torch.float64))
    # shift the best score to 0 before dividing: a tiny temperature then sends the others to -inf, never
    # the best to inf (softmax is shift-invariant, so nothing else changes)
    scores = (scores - scores.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # stable: of exactly tied ids, the lower ones rank first (as greedy's ties go to the lowest id)
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True, stable=True)
        sorted_probs = torch.softmax(sorted_scores, dim=-1)
        # drop a token when the tokens ranked before it already hold top_p of the mass
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return torch.softmax(scores, dim=-1)


@attrs.frozen
class Sampler:
    """Sampling options bundled with the transform they define; ``temperature == 0`` is greedy."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """:func:`probabilities` with these options."""
        return probabilities(logits, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)

    def sample(self, logits: torch.Tensor, generator: torch.Generator | None) -> int:
        """:func:`sample_id` with these options: one id from 1-D ``logits`` (greedy draws nothing)."""
        return sample_id(logits, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, generator=generator)


@attrs.frozen
class SamplingOptions:
    """The sampling options a strategy shares with autoregressive, BLT-S and BLT-DV: subclass it (with
    ``@attrs.frozen``) to add the strategy's own fields; :attr:`sampler` bundles the three."""

    #: 0 = greedy; otherwise the softmax temperature of sampling
    temperature: float = options.number(0.0, minimum=0.0)
    #: sample only among the k most likely bytes (None = no limit)
    top_k: int | None = options.integer(None, minimum=1, optional=True)
    #: sample only among the most likely bytes holding this much probability (None = no limit)
    top_p: float | None = options.number(None, minimum=0.0, minimum_open=True, maximum=1.0, optional=True)

    @property
    def sampler(self) -> Sampler:
        return Sampler(self.temperature, self.top_k, self.top_p)


def categorical(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One id drawn from the 1-D distribution ``probs`` with ``generator`` (the only categorical draw).
    The draw happens on the generator's device (the request's generator is a CPU one), so a model on a
    GPU samples too, with the same draws as on the CPU."""
    if generator is not None and probs.device != generator.device:
        probs = probs.to(generator.device)
    return int(torch.multinomial(probs, 1, generator=generator))


def bernoulli(prob: float, generator: torch.Generator | None) -> bool:
    """True with probability ``prob`` (the only coin flip).

    With a generator (sampling) one number is always drawn, even when ``prob`` is 0 or 1: how much
    randomness a decision consumes must never depend on rounding (a ratio p/q of 1 - 1e-16 in one run and
    1.0 in another would otherwise shift every later draw, and a request batched with others would no
    longer sample what it samples alone). Without one (greedy), ``prob`` is 0 or 1 and nothing is drawn."""
    if generator is None:
        return prob >= 1.0
    return bool(torch.rand((), generator=generator, dtype=torch.float64) < prob)


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """An id from the 1-D distribution ``probs``: drawn with ``generator`` when sampling (always one draw,
    for the reason :func:`bernoulli` gives); without one (greedy), ``probs`` is one-hot and is read off."""
    if generator is None:
        return int(probs.argmax())
    return categorical(probs, generator)


def sample_id(logits: torch.Tensor, *, temperature: float, top_k: int | None = None, top_p: float | None = None,
              generator: torch.Generator | None = None) -> int:
    """Sample one id from 1-D ``logits``; temperature 0 means greedy."""
    if temperature == 0:
        return greedy_id(logits)
    return categorical(probabilities(logits, temperature=temperature, top_k=top_k, top_p=top_p), generator)
