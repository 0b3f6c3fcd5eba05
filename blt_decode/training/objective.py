"""The training objectives: next-byte loss and the BLT-D block masked-diffusion loss.

Randomness is per *row of the global batch*: the corruption of row ``r`` at step ``k`` depends only on
(seed, k, r) (:func:`row_generator`), so a batch split across processes or micro-batches is corrupted
exactly as the whole batch on one process would be.
"""

from __future__ import annotations

from typing import Sequence

import attrs
import numpy as np
import torch
import torch.nn.functional as F

from blt_decode.model.blt import PatchLayout
from blt_decode.model.tokenizer import MASK_ID
from blt_decode.model.tokenizer import PAD_ID


def next_byte_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats) of predicting ids[:, 1:] from logits[:, :-1]."""
    return F.cross_entropy(_at_least_f32(logits[:, :-1].reshape(-1, logits.shape[-1])), ids[:, 1:].reshape(-1))


def _at_least_f32(x: torch.Tensor) -> torch.Tensor:
    # losses in float32 at least (bf16 autocast), but keep float64 when the model runs in it
    return x.to(torch.promote_types(x.dtype, torch.float32))


def diffusion_loss_sum(block_logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor,
                       t: torch.Tensor) -> torch.Tensor:
    """Σ over masked block positions of cross-entropy / t (the numerator of :func:`diffusion_loss`)."""
    ce = F.cross_entropy(_at_least_f32(block_logits.reshape(-1, block_logits.shape[-1])), targets.reshape(-1),
                         reduction="none").view_as(targets)
    return (ce * (masked.to(ce.dtype) / t.to(ce.dtype))).sum()


def diffusion_loss(block_logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor, t: torch.Tensor,
                   valid: torch.Tensor) -> torch.Tensor:
    """The block masked-diffusion loss: cross-entropy at masked positions weighted by 1/t, summed and
    divided by the number of valid (non-PAD) block positions.

    block_logits [N, L, V]; targets, masked, t, valid: [N, L] (t is the block's time at each position).
    Zero when nothing is masked. Its expectation over the masking is the mean cross-entropy of the
    positions, since each is masked with probability t.
    """
    return diffusion_loss_sum(block_logits, targets, masked, t) / valid.sum().clamp(min=1)


def row_generator(seed: int, step: int, row: int) -> torch.Generator:
    """The generator of one row of the global batch at one step (independent of how the batch is split)."""
    state = np.random.SeedSequence([seed, step, row, 0xB17D]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


@attrs.frozen
class NoisyBlocks:
    """The corrupted blocks of a batch (:func:`make_blocks`): ``nb`` blocks of ``block_size`` (B) per row,
    laid out one after another, with what the loss needs."""

    block_starts: tuple[tuple[int, ...], ...]  #: per row: the patch starts that carry a block
    block_size: int
    noisy: torch.Tensor  #: [N, nb*B] decoder input ids (MASK where masked, PAD past the end / padding)
    targets: torch.Tensor  #: [N, nb*B] clean ids (PAD where invalid)
    masked: torch.Tensor  #: [N, nb*B] bool
    t: torch.Tensor  #: [N, nb*B] the block's diffusion time (1 where invalid)
    valid: torch.Tensor  #: [N, nb*B] bool: a real byte of the sequence (not PAD)


def make_blocks(ids: torch.Tensor, layout: PatchLayout, block_size: int,
                generator: torch.Generator | Sequence[torch.Generator], t_min: float = 1e-3) -> NoisyBlocks:
    """Blocks of ``block_size`` at every patch start except BOS (position 0), t ~ U(t_min, 1) per block,
    each real byte masked with probability t; PAD past the sequence end (never masked, no loss).

    ``generator`` is one generator per row (see :func:`row_generator`), or one shared by all rows."""
    n, length = ids.shape
    gens = [generator] * n if isinstance(generator, torch.Generator) else list(generator)
    if len(gens) != n:
        raise ValueError(f"{len(gens)} generators for {n} rows")
    rows = tuple(tuple(s for s in starts if 0 < s < length) for starts in layout.starts)
    nb = max(1, max(len(r) for r in rows))
    lb = nb * block_size
    cpu_ids = ids.cpu()
    targets = torch.full((n, lb), PAD_ID, dtype=torch.long)
    t = torch.ones(n, lb)
    valid = torch.zeros(n, lb, dtype=torch.bool)
    masked = torch.zeros(n, lb, dtype=torch.bool)
    offsets = torch.arange(block_size)
    for r, starts in enumerate(rows):
        if not starts:
            continue
        width = len(starts) * block_size
        times = t_min + (1 - t_min) * torch.rand(len(starts), generator=gens[r])
        positions = (torch.tensor(starts)[:, None] + offsets[None, :]).flatten()
        real = positions < length
        targets[r, :width] = torch.where(real, cpu_ids[r, positions.clamp(max=length - 1)], PAD_ID)
        valid[r, :width] = real
        t[r, :width] = times.repeat_interleave(block_size)
        masked[r, :width] = (torch.rand(width, generator=gens[r]) < t[r, :width]) & real
    noisy = torch.where(masked, torch.full_like(targets, MASK_ID), targets)
    if not any(rows):  # no block at all in the batch: one dummy PAD block keeps shapes valid
        rows = tuple((1,) if not r else r for r in rows)
    device = ids.device
    return NoisyBlocks(rows, block_size, noisy.to(device), targets.to(device), masked.to(device), t.to(device),
                       valid.to(device))
