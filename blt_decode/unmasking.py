"""Filling a masked block by diffusion passes: the unmasking rules shared by BLT-D and BLT-DV.

- ``confidence`` (α): unmask every masked position whose top probability exceeds α; if none does, the
  single most confident one.
- ``entropy`` (γ): unmask the largest set of masked positions, taken in order of increasing entropy, whose
  summed entropy (nats) stays within γ; at least one.

Each unmasked position takes its greedy byte (special ids other than EOS excluded).
"""

from __future__ import annotations

from typing import Sequence

import torch

from blt_decode.model import MASK_ID
from blt_decode.sampling import mask_special
from blt_decode.session import DecodeSession
from blt_decode.trace import Unmasked


def select_confidence(top_probs: Sequence[float], alpha: float) -> list[int]:
    """Indices (into the masked positions) to unmask under the confidence rule: every position whose
    top probability exceeds ``alpha``, else the single most confident one (the first on ties)."""
    if len(top_probs) == 0:
        raise ValueError("no masked position to choose from")
    chosen = [i for i, p in enumerate(top_probs) if p > alpha]
    return chosen or [max(range(len(top_probs)), key=lambda i: (top_probs[i], -i))]


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
