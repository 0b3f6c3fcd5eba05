"""Where patches start: the one place that decides patch boundaries (the rule: docs/concepts.md)."""

from __future__ import annotations

from typing import Sequence

import attrs
import torch

from blt_decode.model.config import BLTConfig


@attrs.frozen
class Patcher:
    """The patching rule: position t+1 starts a patch when H(t) exceeds ``threshold``, or when the patch
    holding t has reached ``max_patch_length`` (either may be None); position 0 (BOS) is always a patch of its own."""

    #: entropy threshold θ, or None to ignore entropies (static patching)
    threshold: float | None
    max_patch_length: int | None

    @classmethod
    def from_config(cls, config: BLTConfig) -> "Patcher":
        threshold = config.patching_threshold if config.patching_mode == "entropy" else None
        return cls(threshold=threshold, max_patch_length=config.max_patch_length)

    @property
    def uses_entropy(self) -> bool:
        return self.threshold is not None

    def next_starts_patch(self, t: int, entropy: float | None, current_start: int) -> bool:
        """Does position t+1 start a new patch, given H(t) and the start of the patch holding t?"""
        if t == 0:
            return True
        if self.threshold is not None and entropy is not None and entropy > self.threshold:
            return True
        return self.max_patch_length is not None and t + 1 - current_start >= self.max_patch_length

    def extend_starts(self, starts: list[int], first: int, entropies: Sequence[float] | None, end: int) -> list[int]:
        """Append to ``starts`` the boundaries decided by positions first..end-1 (in place; also returned)."""
        for t in range(first, end):
            h = entropies[t - first] if entropies is not None else None
            if self.next_starts_patch(t, h, starts[-1]):
                starts.append(t + 1)
        return starts

    def patch_starts(self, length: int, entropies: Sequence[float] | None = None) -> list[int]:
        """Patch starts of a sequence of ``length`` positions (the last start may equal ``length``)."""
        if length == 0:
            return []
        return self.extend_starts([0], 0, entropies, length)


def entropy_of_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of the softmax of ``logits`` over the last axis."""
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def patch_lengths(starts: list[int], length: int) -> list[int]:
    """Lengths of the patches of a sequence, the trailing empty patch included when it exists."""
    ends = starts[1:] + [length]
    return [e - s for s, e in zip(starts, ends)]
