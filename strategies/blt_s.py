"""BLT-S: self-speculative decoding, exactly greedy, or exactly distributed as AR sampling. Each round
draws the exact first byte, drafts ``k`` more with ``session.draft`` (encoder + decoder on the stale
latent), and verifies them in one ``session.verify`` pass with :func:`~blt_decode.decoding.speculation.verify_draft`;
``k="auto"`` chooses ``k`` per round. docs/blt-s.md explains why it is exact and what it costs.
"""

from __future__ import annotations

from typing import Iterator, Literal

import attrs
import torch

from blt_decode import strategy
from blt_decode.strategy import EOS_ID, draw

MAX_K = 64


@attrs.frozen
class BLTSOptions(strategy.SamplingOptions):
    """Sampling (temperature > 0) is exact speculative sampling."""

    #: bytes drafted per round past the exact first byte (1..64), or "auto" (chosen per round)
    k: int | Literal["auto"] = strategy.integer(8, minimum=1, maximum=MAX_K, also=("auto",))


class SelfSpeculative(strategy.BaseStrategy):
    """The ``blt-s`` strategy: per round the exact first byte, ``k`` bytes drafted on the stale latent and one
    verification pass. Listings show ``description``, not this docstring."""

    name = "blt-s"
    aliases = ("blt_s",)
    description = ("self-speculative: the decoder drafts k bytes past patch boundaries, one full pass verifies; "
                   "exactly greedy, or exactly AR-distributed when sampling; k=auto adapts k per round")
    Options = BLTSOptions

    def lookahead(self, options: BLTSOptions) -> int:
        return (MAX_K if options.k == "auto" else options.k) + 1

    def decode(self, session: strategy.DecodeSession, context: strategy.DecodeContext,
               options: BLTSOptions) -> Iterator[list[int]]:
        sampler = options.sampler
        rng = None if sampler.is_greedy else context.generator  # greedy decoding draws nothing
        following = sampler.probabilities(session.prefill(context.prompt_ids)[-1])
        controller = None
        if options.k == "auto":
            params = session.param_counts
            controller = strategy.DraftLengthController(params, draft_pass_params=params.encoder + params.decoder, hi=MAX_K)
            controller.start(patches=session.closed_patches, length=session.length)
        produced = 0
        while True:
            first = draw(following, rng)
            # never draft bytes that max_new_bytes would cut off anyway
            remaining = context.max_new_bytes - produced - 1
            k = controller.choose(remaining) if controller is not None else min(options.k, remaining)
            if first == EOS_ID or k <= 0:
                yield [first]
                return
            draft, drawn_from = [first], []
            draft_logits = session.draft([first])[-1]
            while True:
                q = sampler.probabilities(draft_logits)
                guess = draw(q, rng)
                draft.append(guess)
                drawn_from.append(q)
                if guess == EOS_ID or len(draft) == k + 1:
                    break
                draft_logits = session.draft([guess])[-1]

            # greedy drafts are deterministic (a point mass at each guess): no proposal rows needed
            proposals = None if sampler.is_greedy else torch.stack(drawn_from)
            result = strategy.verify_draft(session, draft, sampler=sampler, proposals=proposals, generator=rng, k=k)
            accepted, following = result.accepted, result.following
            if controller is not None:
                controller.observe(accepted=accepted - 1, rejected=accepted < len(draft), drafted=len(draft) - 1,
                                   first_boundary=result.first_boundary, boundaries=result.boundaries)
            produced += accepted
            yield draft[:accepted]


@strategy.hookimpl
def register_strategies(register):
    """Register the ``blt-s`` strategy (alias ``blt_s``)."""
    register(SelfSpeculative())
