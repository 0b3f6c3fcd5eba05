"""BLT-DV: block diffusion drafts, autoregressive verification; exactly the model's greedy output.

Each round starts from exact next-byte logits, whose greedy byte is the block's first byte (exact, and
given to the denoiser unmasked). The other ``block_size - 1`` positions are drafted by diffusion
(``session.denoise``): with ``alpha=None`` in one decoder pass (every position takes its greedy byte);
otherwise by the confidence rule with threshold ``alpha`` (default 0.3) until no mask is left. One
``session.verify`` pass (patcher, encoder, global model where patches close, decoder) over the block
gives the autoregressive logits at every position; the longest prefix on which the draft equals the
verified greedy choice is kept and every cache is rolled back to it. The verified logits after it give
the next round's first byte: the corrected byte (or a free one when the whole block matched).

With causal patching, the verified logits are exactly the autoregressive ones, so the output equals
greedy autoregressive decoding with the same model, whatever the drafts are.
"""

from __future__ import annotations

from typing import Iterator

import attrs

from blt_decode import options
from blt_decode.hookspecs import hookimpl
from blt_decode.model import MASK_ID
from blt_decode.protocol import DecodeContext
from blt_decode.sampling import greedy_id
from blt_decode.session import DecodeSession
from blt_decode.speculation import verify_draft
from blt_decode.tokenizer import EOS_ID
from blt_decode.unmasking import fill_block

MAX_BLOCK = 64


@attrs.frozen
class BLTDVOptions:
    #: positions per block, the exact first byte included
    block_size: int = options.integer(8, minimum=2, maximum=MAX_BLOCK)
    #: confidence threshold of the diffusion draft; None = draft in a single decoder pass
    alpha: float | None = options.number(0.3, minimum=0.0, maximum=1.0, optional=True)


class DiffusionVerify:
    name = "blt-dv"
    aliases = ("blt_dv",)
    description = "block diffusion drafts + one autoregressive verification pass per block; exactly greedy"
    Options = BLTDVOptions

    def lookahead(self, options: BLTDVOptions) -> int:
        return options.block_size

    def _draft(self, session: DecodeSession, first: int, size: int, alpha: float | None) -> list[int]:
        block = [first] + [MASK_ID] * (size - 1)
        # alpha=None: one pass fills every position; else the confidence rule with threshold alpha
        fill_block(session, block, rule="confidence", alpha=alpha or 0.0, max_passes=1 if alpha is None else None)
        return block

    def decode(self, session: DecodeSession, context: DecodeContext, options: BLTDVOptions) -> Iterator[list[int]]:
        logits = session.prefill(context.prompt_ids)[-1]
        produced = 0
        while True:
            first = greedy_id(logits)
            # never draft bytes that max_new_bytes would cut off anyway
            size = min(options.block_size, context.max_new_bytes - produced)
            if first == EOS_ID or size <= 1:
                yield [first]
                if first == EOS_ID:
                    return
                logits = session.append([first])[-1]
                produced += 1
                continue
            draft = self._draft(session, first, size, options.alpha)
            accepted, logits = verify_draft(session, draft)
            session.stats.add(blocks=1)
            produced += accepted
            yield draft[:accepted]


@hookimpl
def register_strategies(register):
    register(DiffusionVerify())
