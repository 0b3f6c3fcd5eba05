"""BLT-DV: block diffusion drafts, autoregressive verification; exactly the model's greedy output, or
exactly distributed as its autoregressive sampling.

Each round starts from the exact distribution of the next byte; the block's first byte is drawn from it
(its greedy choice at temperature 0) and given to the denoiser unmasked. The other ``block_size - 1``
positions are drafted by diffusion (``session.denoise``): with ``alpha=None`` in one decoder pass;
otherwise by the confidence rule with threshold ``alpha`` (default 0.3) until no mask is left. One
``session.verify`` pass (patcher, encoder, global model where patches close, decoder) over the block
gives the autoregressive logits at every position; the accept rule of :mod:`blt_decode.speculation`
keeps a prefix and rolls every cache back to it, and gives the next round's first-byte distribution.

Greedy (``temperature=0``, the default): every position takes its greedy byte and a drafted byte is kept
iff it equals the verified greedy choice. With causal patching the verified logits are exactly the
autoregressive ones, so the output equals greedy autoregressive decoding, whatever the drafts are.

Sampling (``temperature > 0``, optional ``top_k``/``top_p``): drafted positions are drawn from the
diffusion pass's distribution q (same transforms as the target p), and speculative sampling makes the
output exactly distributed as autoregressive sampling. Exactness needs each position's q to depend only
on the bytes before it, so with ``alpha`` set the confidence rule unmasks strictly left to right here
(the leading masked positions above ``alpha``, at least one per pass), see
:func:`blt_decode.unmasking.sample_block`.

``block_size="auto"`` chooses each round's block size in 2..64 from the running acceptance, the
denoising passes per drafted byte and the model's per-module parameter counts
(:class:`blt_decode.speculation.DraftLengthController`).
"""

from __future__ import annotations

from typing import Iterator, Literal

import attrs
import torch

from blt_decode import options
from blt_decode.hookspecs import hookimpl
from blt_decode.protocol import DecodeContext
from blt_decode.sampling import Sampler, draw
from blt_decode.session import DecodeSession
from blt_decode.speculation import DraftLengthController, verify_draft
from blt_decode.tokenizer import EOS_ID, MASK_ID
from blt_decode.unmasking import fill_block, sample_block

MAX_BLOCK = 64


@attrs.frozen
class BLTDVOptions:
    #: positions per block, the exact first byte included (2..64), or "auto" (chosen per round)
    block_size: int | Literal["auto"] = options.integer(8, minimum=2, maximum=MAX_BLOCK, also=("auto",))
    #: confidence threshold of the diffusion draft; None = draft in a single decoder pass
    alpha: float | None = options.number(0.3, minimum=0.0, maximum=1.0, optional=True)
    #: 0 = greedy; otherwise softmax temperature for (exact speculative) sampling
    temperature: float = options.number(0.0, minimum=0.0)
    #: sample only among the k most likely bytes (None = no limit)
    top_k: int | None = options.integer(None, minimum=1, optional=True)
    #: sample only among the most likely bytes holding this much probability (None = no limit)
    top_p: float | None = options.number(None, minimum=0.0, minimum_open=True, maximum=1.0, optional=True)


class DiffusionVerify:
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
            passes = fill_block(session, block, rule="confidence", alpha=options.alpha or 0.0,
                                max_passes=1 if options.alpha is None else None)
            return block, None, passes
        passes, drawn_from = sample_block(session, block, sampler=sampler, generator=rng, alpha=options.alpha)
        return block, drawn_from, passes

    def decode(self, session: DecodeSession, context: DecodeContext, options: BLTDVOptions) -> Iterator[list[int]]:
        sampler = Sampler(options.temperature, options.top_k, options.top_p)
        rng = None if sampler.is_greedy else context.generator  # greedy decoding draws nothing
        following = sampler.probabilities(session.prefill(context.prompt_ids)[-1])
        controller = None
        if options.block_size == "auto":
            params = session.param_counts
            # a denoising pass reads the decoder only; one pass drafts the whole block when alpha is None.
            # Diffusion drafts are guesses before a patch boundary too: no optimistic fresh prior
            controller = DraftLengthController(params, draft_pass_params=params.decoder, hi=MAX_BLOCK - 1,
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
            result = verify_draft(session, block, sampler=sampler, proposals=proposals, generator=rng, k=size - 1)
            accepted, following = result.accepted, result.following
            session.stats.add(blocks=1)
            if controller is not None:
                controller.observe(accepted=accepted - 1, rejected=accepted < len(block), drafted=len(block) - 1,
                                   first_boundary=result.first_boundary, boundaries=result.boundaries,
                                   draft_passes=passes)
            produced += accepted
            yield block[:accepted]


@hookimpl
def register_strategies(register):
    register(DiffusionVerify())
