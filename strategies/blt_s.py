"""BLT-S: self-speculative decoding, exactly greedy, or exactly distributed as AR sampling.

Each round starts from the exact distribution of the next byte. The first byte is drawn from it (its
greedy choice at temperature 0). The decoder then drafts ``k`` more bytes with ``session.draft``:
encoder + decoder only, reading the last available latent, i.e. skipping the patcher and the global model
even where a patch would close. One ``session.verify`` pass runs the patcher, encoder, global model and
decoder over the whole draft, reusing the caches of the accepted prefix. The accept rule of
:mod:`blt_decode.speculation` keeps a prefix and rolls every cache back to it; it returns the next
round's first-byte distribution (greedy: the corrected byte, or the free byte when all ``k`` matched).

Greedy (``temperature=0``, the default): drafts are the stale-latent greedy choices and a drafted byte is
kept iff it equals the verified greedy choice. With causal patching (a boundary depends only on earlier
bytes) the verified logits are exactly the autoregressive ones, so the output equals greedy
autoregressive decoding.

Sampling (``temperature > 0``, with optional ``top_k``/``top_p``): drafts are drawn from the stale-latent
distribution q and checked by speculative sampling against the verified distribution p (both through
the same :func:`blt_decode.sampling.probabilities` transform). The output is then distributed exactly as
autoregressive sampling with the same options (not byte-identical for the same seed: the random draws
differ).

``k="auto"`` chooses each round's draft length in 1..64 from the running acceptance and the model's
per-module parameter counts (:class:`blt_decode.speculation.DraftLengthController`).
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
from blt_decode.tokenizer import EOS_ID

MAX_K = 64


@attrs.frozen
class BLTSOptions:
    #: bytes drafted per round past the exact first byte (1..64), or "auto" (chosen per round)
    k: int | Literal["auto"] = options.integer(8, minimum=1, maximum=MAX_K, also=("auto",))
    #: 0 = greedy; otherwise softmax temperature for (exact speculative) sampling
    temperature: float = options.number(0.0, minimum=0.0)
    #: sample only among the k most likely bytes (None = no limit)
    top_k: int | None = options.integer(None, minimum=1, optional=True)
    #: sample only among the most likely bytes holding this much probability (None = no limit)
    top_p: float | None = options.number(None, minimum=0.0, minimum_open=True, maximum=1.0, optional=True)


class SelfSpeculative:
    name = "blt-s"
    aliases = ("blt_s",)
    description = ("self-speculative: the decoder drafts k bytes past patch boundaries, one full pass verifies; "
                   "exactly greedy, or exactly AR-distributed when sampling; k=auto adapts k per round")
    Options = BLTSOptions

    def lookahead(self, options: BLTSOptions) -> int:
        return (MAX_K if options.k == "auto" else options.k) + 1

    def decode(self, session: DecodeSession, context: DecodeContext, options: BLTSOptions) -> Iterator[list[int]]:
        sampler = Sampler(options.temperature, options.top_k, options.top_p)
        rng = None if sampler.is_greedy else context.generator  # greedy decoding draws nothing
        following = sampler.probabilities(session.prefill(context.prompt_ids)[-1])
        controller = None
        if options.k == "auto":
            params = session.param_counts
            controller = DraftLengthController(params, draft_pass_params=params.encoder + params.decoder, hi=MAX_K)
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
            result = verify_draft(session, draft, sampler=sampler, proposals=proposals, generator=rng, k=k)
            accepted, following = result.accepted, result.following
            if controller is not None:
                controller.observe(accepted=accepted - 1, rejected=accepted < len(draft), drafted=len(draft) - 1,
                                   first_boundary=result.first_boundary, boundaries=result.boundaries)
            produced += accepted
            yield draft[:accepted]


@hookimpl
def register_strategies(register):
    register(SelfSpeculative())
