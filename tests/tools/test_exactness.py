"""``measure_flips`` (``blt-decode exactness``): flips and near-ties counted per prompt, over the bytes compared."""

import torch

import blt_decode as bd
from blt_decode import api
from blt_decode.tools import exactness

PROMPTS = [b"def f(x):", b"import os\n", b"The cat", b"for i in"]


def test_near_ties_are_counted_over_each_prompts_compared_bytes():
    """Each prompt counts its AR run's near-ties up to its own first differing byte (a running total over
    the earlier prompts counted later prompts' ties past their flip). BLT-D in bfloat16 on a random model
    flips on several prompts, so later prompts are cut short."""
    model = bd.random_model("tiny", 0).to(torch.bfloat16)
    options = {"block_size": 4}
    report = exactness.measure_flips(model, "blt-d", options, prompts=PROMPTS, max_new_bytes=32, progress=False)
    compared = ties = flips = 0
    for prompt in PROMPTS:
        ar = api.generate(model, prompt, max_new_bytes=32)
        other = api.generate(model, prompt, strategy="blt-d", max_new_bytes=32, **options)
        diff = next((i for i, (a, b) in enumerate(zip(ar.output, other.output)) if a != b), None)
        seen = len(ar.output) if diff is None else diff + 1
        flips += diff is not None
        compared += seen
        ties += exactness._near_ties(model, prompt, ar.output[:seen])
    assert flips >= 2, "the case must flip on a prompt after the first to check anything"
    assert (report.flips, report.bytes_compared, report.near_ties) == (flips, compared, ties)
    assert report.prompts == len(PROMPTS) and report.dtype == "bfloat16"
