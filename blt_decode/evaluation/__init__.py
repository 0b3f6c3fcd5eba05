"""Evaluating a model as the papers do: benchmark quality beside decoding cost. See docs/evaluation.md.

- :mod:`~blt_decode.evaluation.sandbox`: runs each generated program in a sandboxed subprocess;
- :mod:`~blt_decode.evaluation.humaneval`: HumanEval pass@k per strategy beside Eq. 8 bandwidth, NFEs and
  bytes/s (``blt-decode eval humaneval``);
- :mod:`~blt_decode.evaluation.harness`: a model for EleutherAI's lm-evaluation-harness (needs the
  ``eval`` extra; ``blt-decode eval lm-eval``).
"""
