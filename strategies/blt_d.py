"""BLT-D: block-diffusion decoding (Fast BLT, section "BLT-D inference").

Per block: the patcher, encoder and global model have already run over the committed bytes (the latent
of the patch before the block is known); ``block_size`` [MASK] bytes are placed after the committed
sequence; decoder-only passes (``session.denoise``) repeat, each unmasking some positions, until none
is left. Unmasking rules (``rule``):

- ``confidence`` (α, default 0.7): unmask every masked position whose top probability exceeds α; if
  none does, the single most confident one.
- ``entropy`` (γ, default 1.0): unmask the largest set of masked positions, taken in order of increasing
  entropy, whose summed entropy (nats) stays within γ; at least one.

Each unmasked position takes its greedy byte (special ids other than EOS excluded). The block is then
appended (one pass of patcher, encoder, global model where patches close, and decoder, which also writes
the clean keys the next block attends to); the patcher decides where patches start inside it, and the
block is committed up to the *last* patch boundary it contains, so that the next block starts at a patch
start, as in training. A block without any boundary is committed whole (the next block then starts
mid-patch and reads the latent of the last closed patch, by the same alignment rule). ``max_passes``
caps the denoising passes per block: the last allowed pass unmasks everything left.
"""

from __future__ import annotations

from typing import Iterator, Literal

import attrs

from blt_decode import options
from blt_decode.hookspecs import hookimpl
from blt_decode.protocol import DecodeContext
from blt_decode.session import DecodeSession
from blt_decode.tokenizer import MASK_ID
from blt_decode.unmasking import fill_block

MAX_BLOCK = 64


@attrs.frozen
class BLTDOptions:
    #: bytes per diffusion block (the default model is trained with 4, 8 and 16)
    block_size: int = options.integer(8, minimum=1, maximum=MAX_BLOCK)
    #: unmasking rule: "confidence" (alpha) or "entropy" (gamma)
    rule: Literal["confidence", "entropy"] = options.choice("confidence", ("confidence", "entropy"))
    #: confidence rule: unmask positions whose top probability exceeds alpha
    alpha: float = options.number(0.7, minimum=0.0, maximum=1.0)
    #: entropy rule: unmask the lowest-entropy positions whose summed entropy (nats) stays within gamma
    gamma: float = options.number(1.0, minimum=0.0)
    #: most decoder passes per block (None = block_size, which always suffices); the last fills all
    max_passes: int | None = options.integer(None, minimum=1, optional=True)


class BlockDiffusion:
    name = "blt-d"
    aliases = ("blt_d",)
    description = "block diffusion: B masked bytes per block, decoder-only passes unmask them (confidence or entropy rule)"
    Options = BLTDOptions

    def lookahead(self, options: BLTDOptions) -> int:
        return options.block_size

    def decode(self, session: DecodeSession, context: DecodeContext, options: BLTDOptions) -> Iterator[list[int]]:
        session.prefill(context.prompt_ids)
        size = options.block_size
        limit = options.max_passes or size
        while True:
            start = session.length
            block = [MASK_ID] * size
            fill_block(session, block, rule=options.rule, alpha=options.alpha, gamma=options.gamma, max_passes=limit)
            session.append(block)
            boundaries = [s for s in session.starts if start < s <= start + size]
            end = max(boundaries) if boundaries else start + size
            if end < start + size:
                session.truncate(end)
            session.stats.add(blocks=1, drafted_bytes=size, accepted_bytes=end - start)
            yield block[: end - start]


@hookimpl
def register_strategies(register):
    register(BlockDiffusion())
