"""BLT-S: self-speculative decoding, exactly greedy.

Each round starts from exact next-byte logits. The first byte is their greedy choice (exact). The decoder
then drafts ``k`` more bytes greedily with ``session.draft``: encoder + decoder only, reading the last
available latent, i.e. skipping the patcher and the global model even where a patch would close. One
``session.verify`` pass runs the patcher, encoder, global model and decoder over the whole draft,
reusing the caches of the accepted prefix. The longest prefix on which the draft matches the verified
greedy choice is kept and every cache is rolled back to it; the verified logits after it give the next
round's first byte (the corrected byte, or the free byte when all ``k`` matched).

With causal patching (a boundary depends only on earlier bytes) the verified logits are exactly the
autoregressive ones, so the output equals greedy autoregressive decoding; savings come from running the
global model (and patcher) once per round instead of once per patch.
"""

from __future__ import annotations

from typing import Iterator

import attrs

from blt_decode import options
from blt_decode.hookspecs import hookimpl
from blt_decode.protocol import DecodeContext
from blt_decode.sampling import greedy_id
from blt_decode.session import DecodeSession
from blt_decode.speculation import verify_draft
from blt_decode.tokenizer import EOS_ID

MAX_K = 64


@attrs.frozen
class BLTSOptions:
    #: bytes drafted per round past the exact first byte (1..64)
    k: int = options.integer(8, minimum=1, maximum=MAX_K)


class SelfSpeculative:
    name = "blt-s"
    aliases = ("blt_s",)
    description = "self-speculative: the decoder drafts k bytes past patch boundaries, one full pass verifies; exactly greedy"
    Options = BLTSOptions

    def lookahead(self, options: BLTSOptions) -> int:
        return options.k + 1

    def decode(self, session: DecodeSession, context: DecodeContext, options: BLTSOptions) -> Iterator[list[int]]:
        logits = session.prefill(context.prompt_ids)[-1]
        produced = 0
        while True:
            first = greedy_id(logits)
            # never draft bytes that max_new_bytes would cut off anyway
            k = min(options.k, context.max_new_bytes - produced - 1)
            if first == EOS_ID or k <= 0:
                yield [first]
                return
            draft = [first]
            draft_logits = session.draft([first])[-1]
            while True:
                guess = greedy_id(draft_logits)
                draft.append(guess)
                if guess == EOS_ID or len(draft) == k + 1:
                    break
                draft_logits = session.draft([guess])[-1]

            accepted, logits = verify_draft(session, draft)
            produced += accepted
            yield draft[:accepted]


@hookimpl
def register_strategies(register):
    register(SelfSpeculative())
