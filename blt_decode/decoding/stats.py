"""The one statistics record of a generation: forward passes per module, bytes, patches, time, bandwidth.

Only the decode session's primitives count forward passes (see :mod:`blt_decode.decoding.session`); strategies
add their draft/accept/block counts through :meth:`StatsRecorder.add`.
"""

from __future__ import annotations

from typing import Any, Iterable

import attrs
import torch

from blt_decode.model import tokenizer
from blt_decode.model.blt import ParamCounts
from blt_decode.model.stacks import Stack, per_stack

BYTES_PER_PARAM = 2  # the paper's Eq. 8 assumes bf16 weights


ForwardPasses = per_stack(
    "ForwardPasses", "Forward evaluations (NFE) of each stack; fields named by ``Stack.attr``. A pass over a "
    "chunk of T positions counts once: its weights are read once, which is what memory-bandwidth-bound "
    "decoding pays for.", __name__, default=0)


def bandwidth_gb(passes: ForwardPasses, params: ParamCounts, bytes_per_param: int = BYTES_PER_PARAM) -> float:
    """Estimated weight traffic in GB, the paper's Eq. 8 with each module's own pass count:
    ``2 · (N_dec·P_dec + N_enc·P_enc + N_glob·P_glob) / 1e9``. Eq. 8 writes N_enc·(P_enc + P_glob),
    assuming the encoder runs only with the global model; the two agree when N_enc = N_glob. The entropy
    model is left out, as in the paper (reported separately as ``patcher`` passes)."""
    total = sum(passes[stack] * params[stack] for stack in Stack if stack is not Stack.PATCHER)
    return bytes_per_param * total / 1e9


@attrs.frozen
class DecodeStats:
    """The statistics of one generation: forward passes per stack, bytes, patches, time, why it stopped, and
    the draft/block counts of the strategies that have them. ``to_dict`` adds the derived figures."""

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
    #: the seed of the random draws (given, or drawn from the operating system); None when decoding drew
    #: no random numbers (greedy decoding), so that a greedy run does not report a seed that did nothing
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

    #: forward passes per stack (the session counts them from its runner's results)
    passes: dict[Stack, int] = attrs.field(factory=lambda: dict.fromkeys(Stack, 0))
    drafted_bytes: int = 0
    accepted_bytes: int = 0
    verify_passes: int = 0
    blocks: int = 0
    denoise_passes: int = 0

    def add(self, **counts: int) -> None:
        """Add to the strategy counters (``drafted_bytes=3``); forward passes are counted by the session."""
        for name, value in counts.items():
            if name == "passes" or not hasattr(self, name):
                raise AttributeError(f"no strategy statistic named {name!r}")
            setattr(self, name, getattr(self, name) + value)

    def count(self, stacks: Iterable[Stack]) -> None:
        """One forward pass of each of ``stacks``."""
        for stack in stacks:
            self.passes[stack] += 1

    def strategy_counters(self) -> dict[str, int]:
        """The strategy counters by name (every field but ``passes``; DecodeStats has a field of each)."""
        return {f.name: getattr(self, f.name) for f in attrs.fields(type(self)) if f.name != "passes"}

    def forward_passes(self) -> ForwardPasses:
        return ForwardPasses(**{stack.attr: n for stack, n in self.passes.items()})


def autoregressive_passes(model: Any, prompt: bytes, output: bytes, tokens: int) -> ForwardPasses:
    """The forward passes autoregressive decoding makes to commit the same ``tokens`` (``output`` and
    the EOS, if one ended it) after ``prompt``: a prefill and one step per token but the last, each
    through the patcher, encoder and decoder; the global model at the prefill and at every step whose
    byte starts a patch. Patching is causal, so one patch layout of the whole sequence tells where."""
    if tokens == 0:
        return ForwardPasses()
    prompt_ids = tokenizer.encode(prompt)
    with torch.no_grad():
        ids = torch.tensor([prompt_ids + tokenizer.encode(output, add_bos=False)], device=model.device)
        starts = model.patch_layout(ids).starts[0]
    start, end = len(prompt_ids), len(prompt_ids) + tokens - 1  # the prefill's length, the last step's
    global_ = int(sum(1 for s in starts if s <= start) > 1) + sum(1 for s in starts if start < s <= end)
    return ForwardPasses(tokens if model.patcher.uses_entropy else 0, tokens, global_, tokens)


def summary(stats: DecodeStats, reference: ForwardPasses | None = None) -> list[str]:
    """Two short lines on what a generation did, in the manner of llama.cpp's and vLLM's timing lines:
    bytes, time and speed; forward passes per module and the Eq. 8 weight traffic, against the
    ``reference`` passes (autoregressive decoding of the same bytes, :func:`autoregressive_passes`) when
    given; what speculation or diffusion added (acceptance, blocks)."""
    rate = f"{stats.bytes_per_second:.1f} bytes/s" if stats.wall_time_s > 0 else "-"
    first = ""
    if stats.time_to_first_byte_s is not None:
        first = f" (first byte after {1000 * stats.time_to_first_byte_s:.0f} ms"
        first += f", then {stats.decode_bytes_per_second:.1f} bytes/s)" if stats.decode_bytes_per_second else ")"
    seed = f", seed {stats.seed}" if stats.seed is not None else ""
    timing = f"{stats.new_bytes} bytes in {stats.wall_time_s:.2f} s = {rate}{first}; stopped by {stats.stop_reason}{seed}"
    p = stats.passes
    work = (f"forward passes: {', '.join(f'{stack.value} {n}' for stack, n in p.items())}; "
            f"Eq. 8 weights read {stats.bandwidth_gb:.4g} GB")
    ar = bandwidth_gb(reference, stats.params) if reference is not None else 0.0
    if ar > 0:
        work += f" = {stats.bandwidth_gb / ar:.2f}x what AR reads for these bytes ({ar:.4g} GB)"
    if stats.acceptance_rate is not None:
        work += f"; accepted {stats.accepted_bytes}/{stats.drafted_bytes} drafted bytes ({stats.acceptance_rate:.2f})"
    if stats.blocks:
        work += f"; {stats.blocks} blocks, {stats.new_bytes / stats.blocks:.1f} bytes and {p.decoder / stats.blocks:.1f} decoder passes each"
    return [timing, work]
