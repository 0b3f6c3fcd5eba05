"""Everything a decoding strategy is written with, from one import (``from blt_decode import strategy``).

The contract is :mod:`blt_decode.decoding.protocol`; docs/plugins.md documents every name below and the session's
primitives, docs/tutorial.md writes two strategies with them, and :mod:`blt_decode.testing` checks them.
The built-in strategies (``blt_decode.strategies.*``) import only this module.
"""

from __future__ import annotations

from blt_decode.decoding.options import choice, flag, integer, number
from blt_decode.decoding.protocol import BaseStrategy, DecodeContext, NoOptions
from blt_decode.decoding.sampling import Sampler, SamplingOptions, draw, greedy, greedy_id, probabilities, sample_id
from blt_decode.decoding.session import DecodeSession
from blt_decode.decoding.speculation import DraftLengthController, Verification, verify_draft
from blt_decode.decoding.unmasking import fill_block, sample_block
from blt_decode.errors import InvalidOptionsError, StrategyError
from blt_decode.model.blt import ParamCounts
from blt_decode.model.tokenizer import BOS_ID, EOS_ID, MASK_ID, OFFSET, VOCAB_SIZE
from blt_decode.plugins.hookspecs import hookimpl

__all__ = [
    # registering
    "hookimpl", "BaseStrategy",
    # what decode() is given
    "DecodeSession", "DecodeContext", "ParamCounts",
    # the id space
    "BOS_ID", "EOS_ID", "MASK_ID", "OFFSET", "VOCAB_SIZE",
    # options
    "NoOptions", "SamplingOptions", "integer", "number", "choice", "flag",
    # choosing bytes
    "Sampler", "draw", "greedy", "greedy_id", "probabilities", "sample_id",
    # drafting and verifying, block diffusion
    "verify_draft", "Verification", "DraftLengthController", "fill_block", "sample_block",
    # errors
    "StrategyError", "InvalidOptionsError",
]
