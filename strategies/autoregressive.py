"""Autoregressive decoding: one byte per decoder step, greedy or sampled. ``cache="kv"`` (default) runs
the incremental session; ``cache="none"`` re-runs the full forward for every byte, as the public
reference generator does, to compare against.
"""

from __future__ import annotations

from typing import Iterator, Literal

import attrs

from blt_decode import strategy


@attrs.frozen
class AutoregressiveOptions(strategy.SamplingOptions):
    """The options of ``autoregressive``: the sampling options, and whether each byte comes from the KV-cached
    session or a full forward (``cache``)."""

    #: "kv": incremental KV-cached decoding; "none": full forward per byte (reference generator)
    cache: Literal["kv", "none"] = strategy.choice("kv", ("kv", "none"))


class Autoregressive(strategy.BaseStrategy):
    """one byte per decoder step; greedy or sampled (temperature, top-k, top-p); KV-cached or uncached"""

    name = "autoregressive"
    aliases = ("ar",)
    Options = AutoregressiveOptions

    def decode(self, session: strategy.DecodeSession, context: strategy.DecodeContext,
               options: AutoregressiveOptions) -> Iterator[list[int]]:
        sampler = options.sampler

        def choose(logits) -> int:
            return sampler.sample(logits, context.generator)

        ids = list(context.prompt_ids)
        if options.cache == "none":
            while True:
                token = choose(session.reference_logits(ids)[-1])
                ids.append(token)
                yield [token]
        logits = session.prefill(ids)[-1]
        while True:
            token = choose(logits)
            yield [token]
            logits = session.append([token])[-1]


@strategy.hookimpl
def register_strategies(register):
    """Register the ``autoregressive`` strategy (alias ``ar``)."""
    register(Autoregressive())
