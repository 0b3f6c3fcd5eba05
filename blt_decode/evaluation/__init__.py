"""Evaluating a model as the papers do: benchmark quality beside decoding cost. See docs/evaluation.md.

- :mod:`~blt_decode.evaluation.sandbox`: runs each generated program in a sandboxed subprocess;
- :mod:`~blt_decode.evaluation.humaneval`: HumanEval pass@k per strategy beside Eq. 8 bandwidth, NFEs and
  bytes/s (``blt-decode eval humaneval``);
- :mod:`~blt_decode.evaluation.harness`: a model for EleutherAI's lm-evaluation-harness (needs the
  ``eval`` extra; ``blt-decode eval lm-eval``);
- :mod:`~blt_decode.evaluation.tasks`: small offline lm-eval tasks cut from the shipped prompt sets.
"""

from __future__ import annotations

from typing import Sequence


def before_stop(output: bytes, stops: Sequence[bytes]) -> bytes:
    """What a benchmark scores of a generation: the output up to where its first stop sequence begins
    (blt-decode's output includes the stop sequence that ended it)."""
    cut = min((i for i in (output.find(s) for s in stops) if i >= 0), default=len(output))
    return output[:cut]
