"""Evaluating a model as the papers do: benchmark quality beside decoding cost. See docs/evaluation.md.

Modules: ``sandbox`` (running generated programs), ``humaneval``, ``harness`` (lm-eval) and ``tasks``."""

from __future__ import annotations

from typing import Sequence


def before_stop(output: bytes, stops: Sequence[bytes]) -> bytes:
    """What a benchmark scores of a generation: the output up to where its first stop sequence begins
    (blt-decode's output includes the stop sequence that ended it)."""
    cut = min((i for i in (output.find(s) for s in stops) if i >= 0), default=len(output))
    return output[:cut]
