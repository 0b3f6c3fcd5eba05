"""BLT-D: block-diffusion decoding. Per block, ``block_size`` [MASK] bytes after the committed sequence
are unmasked by decoder-only ``session.denoise`` passes (confidence or entropy rule,
:mod:`blt_decode.decoding.unmasking`), then appended and committed up to the last patch boundary inside it.
docs/diffusion.md describes the rules, ``max_passes`` and the alignment with training.
"""

from __future__ import annotations

from typing import Iterator, Literal

import attrs

from blt_decode import strategy

MAX_BLOCK = 64


@attrs.frozen
class BLTDOptions:
    """The options of ``blt-d``: the block size, the unmasking rule and its threshold, and the most decoder
    passes per block."""

    #: bytes per diffusion block (the default model is trained with 4, 8 and 16)
    block_size: int = strategy.integer(8, minimum=1, maximum=MAX_BLOCK)
    #: unmasking rule: "confidence" (alpha) or "entropy" (gamma)
    rule: Literal["confidence", "entropy"] = strategy.choice("confidence", ("confidence", "entropy"))
    #: confidence rule: unmask positions whose top probability exceeds alpha
    alpha: float = strategy.number(0.7, minimum=0.0, maximum=1.0)
    #: entropy rule: unmask the lowest-entropy positions whose summed entropy (nats) stays within gamma
    gamma: float = strategy.number(1.0, minimum=0.0)
    #: most decoder passes per block (None = block_size, which always suffices); the last fills all
    max_passes: int | None = strategy.integer(None, minimum=1, optional=True)


class BlockDiffusion(strategy.BaseStrategy):
    """block diffusion: B masked bytes per block, decoder-only passes unmask them (confidence or entropy rule)"""

    name = "blt-d"
    aliases = ("blt_d",)
    Options = BLTDOptions

    def lookahead(self, options: BLTDOptions) -> int:
        return options.block_size

    def decode(self, session: strategy.DecodeSession, context: strategy.DecodeContext,
               options: BLTDOptions) -> Iterator[list[int]]:
        session.prefill(context.prompt_ids)
        size = options.block_size
        limit = options.max_passes or size
        while True:
            start = session.length
            block = [strategy.MASK_ID] * size
            strategy.fill_block(session, block, rule=options.rule, alpha=options.alpha, gamma=options.gamma, max_passes=limit)
            session.append(block)
            boundaries = [s for s in session.starts if start < s <= start + size]
            end = max(boundaries) if boundaries else start + size
            if end < start + size:
                session.truncate(end)
            session.stats.add(blocks=1, drafted_bytes=size, accepted_bytes=end - start)
            yield block[: end - start]


@strategy.hookimpl
def register_strategies(register):
    """Register the ``blt-d`` strategy (alias ``blt_d``)."""
    register(BlockDiffusion())
