"""The one statistics record of a generation: forward passes per module, bytes, patches, time, bandwidth.

Only the decode session's primitives count forward passes (see :mod:`blt_decode.session`); strategies
add their draft/accept/block counts through :meth:`StatsRecorder.add`.
"""

from __future__ import annotations

from typing import Any

import attrs

from blt_decode.model import ParamCounts

BYTES_PER_PARAM = 2  # the paper's Eq. 8 assumes bf16 weights


@attrs.frozen
class ForwardPasses:
    """Forward evaluations (NFE) of each module. A pass over a chunk of T positions counts once: its
    weights are read once, which is what memory-bandwidth-bound decoding pays for."""

    patcher: int = 0
    encoder: int = 0
    global_: int = 0
    decoder: int = 0


def bandwidth_gb(passes: ForwardPasses, params: ParamCounts, bytes_per_param: int = BYTES_PER_PARAM) -> float:
    """Estimated weight traffic in GB, the paper's Eq. 8 with each module's own pass count:
    ``2 · (N_dec·P_dec + N_enc·P_enc + N_glob·P_glob) / 1e9``. Eq. 8 writes N_enc·(P_enc + P_glob),
    assuming the encoder runs only with the global model; the two agree when N_enc = N_glob. The entropy
    model is left out, as in the paper (reported separately as ``patcher`` passes)."""
    total = passes.decoder * params.decoder + passes.encoder * params.encoder + passes.global_ * params.global_
    return bytes_per_param * total / 1e9


@attrs.frozen
class DecodeStats:
    passes: ForwardPasses
    params: ParamCounts
    prompt_bytes: int
    new_bytes: int
    #: tokens the strategy committed, EOS included when it ended the generation
    new_tokens: int
    #: patches closed over the whole sequence (prompt included)
    patches: int
    wall_time_s: float
    #: "eos", "stop_sequence", "max_new_bytes" or "exhausted" (the strategy ended on its own)
    stop_reason: str
    seed: int | None = None
    drafted_bytes: int = 0
    accepted_bytes: int = 0
    verify_passes: int = 0
    blocks: int = 0
    #: decoder passes spent denoising diffusion blocks (BLT-D/DV); part of passes.decoder
    denoise_passes: int = 0
    #: seconds from the start to the first committed byte: prefill plus the first decoding round (what a
    #: streaming user waits before anything appears); None when no byte was produced
    time_to_first_byte_s: float | None = None
    #: bytes/s after the first committed chunk (decoding speed without the prefill); None when no byte
    #: followed the first chunk
    decode_bytes_per_second: float | None = None

    @property
    def bandwidth_gb(self) -> float:
        return bandwidth_gb(self.passes, self.params)

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted_bytes / self.drafted_bytes if self.drafted_bytes else None

    @property
    def bytes_per_second(self) -> float:
        return self.new_bytes / self.wall_time_s if self.wall_time_s > 0 else float("inf")

    @property
    def decoder_passes_per_block(self) -> float | None:
        return self.passes.decoder / self.blocks if self.blocks else None

    @property
    def denoise_passes_per_block(self) -> float | None:
        return self.denoise_passes / self.blocks if self.blocks else None

    def to_dict(self) -> dict[str, Any]:
        d = attrs.asdict(self)
        d.update(
            bandwidth_gb=self.bandwidth_gb,
            acceptance_rate=self.acceptance_rate,
            bytes_per_second=self.bytes_per_second,
            decoder_passes_per_block=self.decoder_passes_per_block,
            denoise_passes_per_block=self.denoise_passes_per_block,
        )
        return d


@attrs.define
class StatsRecorder:
    """Mutable counters a session fills while decoding; frozen into :class:`DecodeStats` at the end."""

    patcher: int = 0
    encoder: int = 0
    global_: int = 0
    decoder: int = 0
    drafted_bytes: int = 0
    accepted_bytes: int = 0
    verify_passes: int = 0
    blocks: int = 0
    denoise_passes: int = 0

    def add(self, **counts: int) -> None:
        for name, value in counts.items():
            if not hasattr(self, name):
                raise AttributeError(f"no statistic named {name!r}")
            setattr(self, name, getattr(self, name) + value)

    def passes(self) -> ForwardPasses:
        return ForwardPasses(self.patcher, self.encoder, self.global_, self.decoder)
