"""Choosing a byte from logits: greedy and sampling (temperature, top-k, top-p). One place for both, so
every strategy breaks ties and masks special ids the same way."""

from __future__ import annotations

import torch

from blt_decode.tokenizer import BOE_ID, BOS_ID, PAD_ID

#: ids a generator never emits (EOS stays allowed: it ends the generation)
NEVER_GENERATED = (BOE_ID, BOS_ID, PAD_ID)


def mask_special(logits: torch.Tensor) -> torch.Tensor:
    out = logits.clone()
    out[..., list(NEVER_GENERATED)] = float("-inf")
    return out


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """Greedy ids over the last axis (ties go to the lowest id)."""
    return mask_special(logits).argmax(dim=-1)


def greedy_id(logits: torch.Tensor) -> int:
    return int(greedy(logits))


def sample_id(logits: torch.Tensor, *, temperature: float, top_k: int | None = None, top_p: float | None = None,
              generator: torch.Generator | None = None) -> int:
    """Sample one id from 1-D ``logits``; temperature 0 means greedy."""
    if temperature == 0:
        return greedy_id(logits)
    scores = mask_special(logits.to(torch.float64)) / temperature
    if top_k is not None and top_k < scores.numel():
        kth = torch.topk(scores, top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(-1)
        # drop a token when the tokens ranked before it already hold top_p of the mass
        drop = (cumulative - torch.softmax(sorted_scores, dim=-1)) >= top_p
        scores[order[drop]] = float("-inf")
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
