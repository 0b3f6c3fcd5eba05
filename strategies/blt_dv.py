"""BLT-DV: block diffusion drafts, autoregressive verification; exactly greedy, or exactly distributed
as AR sampling. Each round draws the exact first byte, drafts the rest of the block by ``session.denoise``
(one pass, or the confidence rule with ``alpha``; left to right when sampling) and verifies it in one
``session.verify`` pass; ``block_size="auto"`` adapts the block per round. See docs/diffusion.md.
"""

from __future__ import annotations

from typing import Iterator, Literal

import attrs
import torch

from blt_decode import strategy
from blt_decode.strategy import EOS_ID, MASK_ID, DecodeSession, Sampler, draw

MAX_BLOCK = 64


@attrs.frozen
class BLTDVOptions(strategy.SamplingOptions):
    """Sampling (temperature > 0) is exact speculative sampling."""

    #: positions per block, the exact first byte included (2..64), or "auto" (chosen per round)
    block_size: int | Literal["auto"] = strategy.integer(8, minimum=2, maximum=MAX_BLOCK, also=("auto",))
    #: confidence threshold of the diffusion draft; None = draft in a single decoder pass
    alpha: float | None = strategy.number(0.3, minimum=0.0, maximum=1.0, optional=True)


class DiffusionVerify(strategy.BaseStrategy):
    """The ``blt-dv`` strategy: per round the exact first byte, a diffusion draft of the rest of the block and
    one verification pass. Listings show ``description``, not this docstring."""

    name = "blt-dv"
    aliases = ("blt_dv",)
    description = ("block diffusion drafts + one autoregressive verification pass per block; exactly greedy, or "
                   "exactly AR-distributed when sampling; block_size=auto adapts the block per round")
    Options = BLTDVOptions

    def lookahead(self, options: BLTDVOptions) -> int:
        return MAX_BLOCK if options.block_size == "auto" else options.block_size

    def _draft(self, session: DecodeSession, first: int, size: int, options: BLTDVOptions, sampler: Sampler,
               rng: torch.Generator) -> tuple[list[int], torch.Tensor | None, int]:
        """The block (exact first byte + drafted ones), the distributions the drafted bytes were drawn
        from (None for greedy: a point mass at each), and the denoising passes spent."""
        block = [first] + [MASK_ID] * (size - 1)
        if sampler.is_greedy:
            # alpha=None: one pass fills every position; else the confidence rule with threshold alpha
            passes = strategy.fill_block(session, block, rule="confidence", alpha=options.alpha or 0.0,
                                max_passes=1 if options.alpha is None else None)
            return block, None, passes
        passes, drawn_from = strategy.sample_block(session, block, sampler=sampler, generator=rng, alpha=options.alpha)
        return block, drawn_from, passes

    def decode(self, session: DecodeSession, context: strategy.DecodeContext,
               options: BLTDVOptions) -> Iterator[list[int]]:
        sampler = options.sampler
        rng = None if sampler.is_greedy else context.generator  # greedy decoding draws nothing
        following = sampler.probabilities(session.prefill(context.prompt_ids)[-1])
        controller = None
        if options.block_size == "auto":
            params = session.param_counts
            # a denoising pass reads the decoder only; one pass drafts the whole block when alpha is None.
            # Diffusion drafts are guesses before a patch boundary too: no optimistic fresh prior
            controller = strategy.DraftLengthController(params, draft_pass_params=params.decoder, hi=MAX_BLOCK - 1,
                                               passes_per_byte=0.0 if options.alpha is None else None,
                                               fresh_prior=(0.5, 2.0), stale_prior=(0.5, 2.0))
            controller.start(patches=session.closed_patches, length=session.length)
        produced = 0
        while True:
            first = draw(following, rng)
            # never draft bytes that max_new_bytes would cut off anyway
            remaining = context.max_new_bytes - produced
            if controller is not None:
                size = controller.choose(remaining - 1) + 1
            else:
                size = min(options.block_size, remaining)
            if first == EOS_ID or size <= 1:
                yield [first]
                if first == EOS_ID:
                    return
                following = sampler.probabilities(session.append([first])[-1])
                produced += 1
                continue
            block, proposals, passes = self._draft(session, first, size, options, sampler, rng)
            if EOS_ID in block[1:]:  # nothing after a drafted EOS can be committed: do not verify it
                block = block[: block.index(EOS_ID, 1) + 1]
                proposals = None if proposals is None else proposals[: len(block) - 1]
            result = strategy.verify_draft(session, block, sampler=sampler, proposals=proposals, generator=rng, k=size - 1)
            accepted, following = result.accepted, result.following
            session.stats.add(blocks=1)
            if controller is not None:
                controller.observe(accepted=accepted - 1, rejected=accepted < len(block), drafted=len(block) - 1,
                                   first_boundary=result.first_boundary, boundaries=result.boundaries,
                                   draft_passes=passes)
            produced += accepted
            yield block[:accepted]


@strategy.hookimpl
def register_strategies(register):
    """Register the ``blt-dv`` strategy (alias ``blt_dv``)."""
    register(DiffusionVerify())
