"""Autoregressive decoding: one byte per decoder step, greedy or sampled.

``cache="kv"`` (default) runs the incremental session: the decoder once per byte, the global model once
per closed patch. ``cache="none"`` re-runs the full forward over the whole sequence for every byte, as
the public reference generator does; it exists to compare against.
"""

from __future__ import annotations

from typing import Iterator, Literal

import attrs

from blt_decode import options
from blt_decode.hookspecs import hookimpl
from blt_decode.protocol import DecodeContext
from blt_decode.sampling import sample_id
from blt_decode.session import DecodeSession


@attrs.frozen
class AutoregressiveOptions:
    #: 0 = greedy; otherwise softmax temperature for sampling
    temperature: float = options.number(0.0, minimum=0.0)
    #: sample only among the k most likely bytes (None = no limit)
    top_k: int | None = options.integer(None, minimum=1, optional=True)
    #: sample only among the most likely bytes holding this much probability (None = no limit)
    top_p: float | None = options.number(None, minimum=0.0, minimum_open=True, maximum=1.0, optional=True)
    #: "kv": incremental KV-cached decoding; "none": full forward per byte (reference generator)
    cache: Literal["kv", "none"] = options.choice("kv", ("kv", "none"))


class Autoregressive:
    name = "autoregressive"
    aliases = ("ar",)
    description = "one byte per decoder step; greedy or sampled (temperature, top-k, top-p); KV-cached or uncached"
    Options = AutoregressiveOptions

    def lookahead(self, options: AutoregressiveOptions) -> int:
        return 0

    def decode(self, session: DecodeSession, context: DecodeContext, options: AutoregressiveOptions) -> Iterator[list[int]]:
        def choose(logits) -> int:
            return sample_id(logits, temperature=options.temperature, top_k=options.top_k, top_p=options.top_p,
                             generator=context.generator)

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


@hookimpl
def register_strategies(register):
    register(Autoregressive())
