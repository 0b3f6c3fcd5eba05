"""Filling a masked block by diffusion passes, shared by BLT-D and BLT-DV: the confidence (α) and
entropy (γ) unmasking rules (:func:`fill_block`, greedy bytes) and their sampling counterpart
(:func:`sample_block`, left to right, as exact speculative sampling needs). docs/diffusion.md states
the rules.
"""

from __future__ import annotations

from typing import Sequence

import torch

from blt_decode.decoding.sampling import Sampler, draw, mask_special
from blt_decode.decoding.session import DecodeSession
from blt_decode.model.tokenizer import MASK_ID
from blt_decode.trace import Unmasked


def select_confidence(top_probs: Sequence[float], alpha: float) -> list[int]:
    """Indices (into the masked positions) to unmask under the confidence rule: every position whose
    top probability exceeds ``alpha``, else the single most confident one (the first on ties)."""
    if len(top_probs) == 0:
        raise ValueError("no masked position to choose from")
    chosen = [i for i, p in enumerate(top_probs) if p > alpha]
    return chosen or [max(range(len(top_probs)), key=lambda i: (top_probs[i], -i))]


def select_confidence_prefix(top_probs: Sequence[float], alpha: float | None) -> list[int]:
    """Indices to unmask under the left-to-right confidence rule: the longest run of leading positions
    whose top probability exceeds ``alpha``, at least the first one (``alpha=None``: all of them)."""
    if len(top_probs) == 0:
        raise ValueError("no masked position to choose from")
    if alpha is None:
        return list(range(len(top_probs)))
    run = 0
    while run < len(top_probs) and top_probs[run] > alpha:
        run += 1
    return list(range(max(run, 1)))


def select_entropy(entropies: Sequence[float], gamma: float) -> list[int]:
    """Indices to unmask under the entropy-bounded rule: the longest prefix of positions sorted by
    increasing entropy (ties by position) whose summed entropy is at most ``gamma``; at least one."""
    if len(entropies) == 0:
        raise ValueError("no masked position to choose from")
    order = sorted(range(len(entropies)), key=lambda i: (entropies[i], i))
    chosen, total = [], 0.0
    for i in order:
        if chosen and total + entropies[i] > gamma:
            break
        if not chosen and entropies[i] > gamma:
            return [i]  # at least one: the most certain position
        chosen.append(i)
        total += entropies[i]
    return sorted(chosen)


def unmask_step(block: list[int], logits: torch.Tensor, rule: str, alpha: float, gamma: float,
                fill_all: bool) -> tuple[list[int], list[float]]:
    """Unmask positions of ``block`` (in place) from one pass's ``logits`` [B, vocab]; returns the
    positions (block indices) and their top probabilities."""
    masked = [i for i, x in enumerate(block) if x == MASK_ID]
    probs = torch.softmax(mask_special(logits[masked].to(torch.float64)), dim=-1)
    top, choice = probs.max(dim=-1)
    if fill_all:
        picked = list(range(len(masked)))
    elif rule == "confidence":
        picked = select_confidence(top.tolist(), alpha)
    elif rule == "entropy":
        logp = torch.log(probs.clamp_min(1e-300))
        picked = select_entropy((-(probs * logp).sum(-1)).tolist(), gamma)
    else:
        raise ValueError(f"unknown unmasking rule {rule!r}: use 'confidence' or 'entropy'")
    for j in picked:
        block[masked[j]] = int(choice[j])
    return [masked[j] for j in picked], [float(top[j]) for j in picked]


def fill_block(session: DecodeSession, block: list[int], *, rule: str = "confidence", alpha: float = 0.7,
               gamma: float = 1.0, max_passes: int | None = None) -> int:
    """Run ``session.denoise`` passes until no [MASK] is left in ``block`` (filled in place); the last
    allowed pass (``max_passes``) fills every remaining position. Emits one trace event per pass and
    returns the number of passes."""
    start, passes = session.length, 0
    limit = max_passes or len(block)
    while MASK_ID in block:
        logits = session.denoise(block)
        passes += 1
        positions, confidences = unmask_step(block, logits, rule, alpha, gamma, fill_all=passes >= limit)
        if session.trace is not None:
            session.emit(Unmasked(start, passes, tuple(start + p for p in positions),
                                  tuple(block[p] for p in positions), tuple(confidences)))
    return passes


def sample_block(session: DecodeSession, block: list[int], *, sampler: Sampler, generator: torch.Generator | None,
                 alpha: float | None) -> tuple[int, torch.Tensor]:
    """Fill the [MASK] positions of ``block`` (in place; they must follow its unmasked prefix) by drawing
    from ``session.denoise`` passes, left to right: each pass draws the positions
    :func:`select_confidence_prefix` picks (``alpha=None``: all of them, in one pass) from
    ``sampler``'s distribution at that pass. Emits one trace event per pass and returns (passes, the
    distribution each masked position was drawn from, in block order [masked, vocab])."""
    start, passes = session.length, 0
    first_masked = block.index(MASK_ID)
    if any(x != MASK_ID for x in block[first_masked:]):
        raise ValueError("sample_block needs the masked positions to form a suffix of the block")
    drawn_from: list[torch.Tensor] = []
    while len(drawn_from) < len(block) - first_masked:
        logits = session.denoise(block)
        passes += 1
        lo = first_masked + len(drawn_from)
        probs = sampler.probabilities(logits[lo:])
        top = probs.max(dim=-1).values.tolist()
        picked = select_confidence_prefix(top, alpha)
        for j in picked:
            block[lo + j] = draw(probs[j], generator)
            drawn_from.append(probs[j])
        if session.trace is not None:
            session.emit(Unmasked(start, passes, tuple(start + lo + j for j in picked),
                                  tuple(block[lo + j] for j in picked), tuple(top[j] for j in picked)))
    return passes, torch.stack(drawn_from)
