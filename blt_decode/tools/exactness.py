"""How often does a strategy that is exact in exact arithmetic flip a byte in float32/bfloat16?

BLT-S and BLT-DV equal greedy decoding when draft, verify and the autoregressive reference compute the
same numbers. In low precision the verify pass (a chunk) and the autoregressive step (one byte) use
different kernels, so a near-tie between the top two bytes can resolve differently. This module counts
those flips honestly instead of hiding them behind tolerances.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Any

import attrs
import torch
from tqdm import tqdm

from blt_decode import api
from blt_decode.errors import PromptSetError
from blt_decode.model import tokenizer
from blt_decode.model.blt import BLTModel


def stdlib_snippets(count: int, length: int = 48) -> list[bytes]:
    """``count`` deterministic prompts: the first ``length`` bytes of evenly spaced stdlib modules."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.stat().st_size > 2 * length)
    if not 1 <= count <= len(files):  # more than there are was an IndexError
        raise PromptSetError(f"--prompts must be in 1..{len(files)} (this Python's stdlib modules of more than "
                             f"{2 * length} bytes), got {count}")
    step = max(1, len(files) // count)
    return [files[i].read_bytes()[:length] for i in range(0, step * count, step)][:count]


@attrs.frozen
class FlipReport:
    """How often ``strategy`` (with ``options``) flipped a byte against greedy autoregressive decoding in
    ``dtype`` over ``prompts`` prompts, beside the near-ties that explain flips; ``*_per_10k``: per compared byte."""

    strategy: str
    options: dict[str, Any]
    dtype: str
    prompts: int
    #: bytes compared: up to and including the first differing byte of each prompt
    bytes_compared: int
    flips: int
    #: greedy steps of the autoregressive run whose top-2 logit gap is within a few ulps
    near_ties: int
    acceptance_rate: float | None

    @property
    def flips_per_10k(self) -> float:
        return 1e4 * self.flips / max(self.bytes_compared, 1)

    @property
    def near_ties_per_10k(self) -> float:
        return 1e4 * self.near_ties / max(self.bytes_compared, 1)


def _near_ties(model: BLTModel, prompt: bytes, output: bytes) -> int:
    ids = torch.tensor([tokenizer.encode(prompt + output)], device=model.device)
    with torch.no_grad():
        logits = model(ids)[0, len(prompt) : len(prompt) + len(output)].float()
    top2 = logits.topk(2, dim=-1).values
    ulp = torch.finfo(model.dtype).eps * top2[:, 0].abs().clamp_min(1.0)
    return int(((top2[:, 0] - top2[:, 1]) <= 4 * ulp).sum())


def measure_flips(model: BLTModel, strategy: str, options: dict[str, Any], *, prompts: list[bytes],
                  max_new_bytes: int, progress: bool = True) -> FlipReport:
    """Decode each prompt with greedy AR and with ``strategy`` (``options``) on ``model``, compare the outputs
    up to their first differing byte, and count the flips and the AR runs' near-ties (a bar if ``progress``)."""
    flips = compared = ties = drafted = accepted = 0
    for prompt in tqdm(prompts, desc=f"{strategy} {model.dtype}", disable=not progress):
        ar = api.generate(model, prompt, max_new_bytes=max_new_bytes)
        other = api.generate(model, prompt, strategy=strategy, max_new_bytes=max_new_bytes, **options)
        drafted += other.stats.drafted_bytes
        accepted += other.stats.accepted_bytes
        diff = next((i for i, (a, b) in enumerate(zip(ar.output, other.output)) if a != b), None)
        if diff is None and len(ar.output) != len(other.output):
            diff = min(len(ar.output), len(other.output))
        # this prompt's bytes compared: all of them, or up to and including the first that differs
        seen = len(ar.output) if diff is None else diff + 1
        flips += diff is not None
        compared += seen
        ties += _near_ties(model, prompt, ar.output[:seen])
    return FlipReport(strategy, options, str(model.dtype).replace("torch.", ""), len(prompts), compared, flips, ties,
                      accepted / drafted if drafted else None)
