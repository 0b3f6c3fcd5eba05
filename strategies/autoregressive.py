"""Autoregressive decoding: one byte per decoder step, greedy or sampled.

``cache="kv"`` (default) runs the incremental session: the decoder once per byte, the global model once
per closed patch. ``cache="none"`` re-runs the full forward over the whole sequence for every byte, as
the public reference generator does; it exists to compare against.
"""

from __future__ import annotations

from typing import Iterator, Literal

import attrs

from blt_decode.hookspecs import hookimpl
from blt_decode.protocol import DecodeContext
from blt_decode.sampling import sample_id
from blt_decode.session import DecodeSession


def _optional_positive_int(instance, attribute, value):
    if value is not None and (not isinstance(value, int) or value <= 0):
        raise ValueError(f"option {attribute.name!r} must be a positive integer or None, got {value!r}")


def _top_p(instance, attribute, value):
    if value is not None and not 0.0 < value <= 1.0:
        raise ValueError(f"option 'top_p' must be in (0, 1], got {value!r}")


def _float_or_none(value):
    return None if value is None else float(value)


@attrs.frozen
class AutoregressiveOptions:
    #: 0 = greedy; otherwise softmax temperature for sampling
    temperature: float = attrs.field(default=0.0, converter=float, validator=attrs.validators.ge(0.0))
    top_k: int | None = attrs.field(default=None, validator=_optional_positive_int)
    top_p: float | None = attrs.field(default=None, converter=_float_or_none, validator=_top_p)
    #: "kv": incremental KV-cached decoding; "none": full forward per byte (reference generator)
    cache: Literal["kv", "none"] = attrs.field(default="kv", validator=attrs.validators.in_(("kv", "none")))


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
