"""Helpers shared by test modules of several folders (tests/ is on sys.path through its conftest.py)."""

import os
import re
import subprocess
import sys
from pathlib import Path

from hypothesis import strategies as st

import blt_decode as bd
from blt_decode import testing

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


#: the requests a mixed batch draws from: every built-in strategy, greedy and seeded sampling
MIXED = [
    ("autoregressive", {}), ("autoregressive", {"temperature": 0.9}), ("autoregressive", {"temperature": 0.7, "top_k": 5}),
    ("blt-s", {"k": 1}), ("blt-s", {"k": 4}), ("blt-s", {"k": 9}), ("blt-s", {"k": "auto"}),
    ("blt-s", {"k": 4, "temperature": 0.8}), ("blt-s", {"k": "auto", "temperature": 1.0, "top_p": 0.9}),
    ("blt-d", {"block_size": 4}), ("blt-d", {"block_size": 3, "rule": "entropy"}),
    ("blt-dv", {"block_size": 4}), ("blt-dv", {"block_size": 3, "alpha": None}), ("blt-dv", {"block_size": "auto"}),
    ("blt-dv", {"block_size": 4, "temperature": 0.7}),
]


@st.composite
def requests(draw, *, strategies=MIXED):
    prompt = draw(testing.prompts(max_size=20))
    name, options = draw(st.sampled_from(strategies))
    stop = draw(st.one_of(st.just(()), st.binary(min_size=1, max_size=2)))
    return bd.Request(prompt, strategy=name, options=options, max_new_bytes=draw(st.integers(0, 24)), stop=stop,
                      seed=draw(st.integers(0, 1000)))


def structural_unmasking_tie(model, batch) -> bool:
    """Does a BLT-D block outrun the decoder's attention window? Its masked positions past the window
    then see only [MASK]s and the same latent: their confidences are equal in exact arithmetic, so which
    one unmasks first is decided by rounding, which batching changes (found by hypothesis: window 2,
    block 4). Real models' windows (512 bytes) exceed any block (at most 64)."""
    window = model.config.decoder.sliding_window
    return window is not None and any(r.strategy == "blt-d" and r.options["block_size"] > window for r in batch)


def tutorial_strategies() -> dict:
    """The tutorial's third-party strategies (docs/tutorial.md's ``blt_rep_penalty.py`` and
    ``blt_lookup.py``), executed as written, by class name."""
    blocks = re.findall(r"```(\w+)\n(.*?)```", (DOCS / "tutorial.md").read_text(), re.S)
    made = {}
    for module, cls in (("blt_rep_penalty.py", "RepetitionPenalty"), ("blt_lookup.py", "Lookup")):
        namespace: dict = {}
        exec(compile(next(c for _, c in blocks if c.startswith(f"# file: {module}")), "tutorial.md", "exec"), namespace)
        made[cls] = namespace[cls]()
    return made


TINY = ("--model", "random:tiny")


def run_cli(*args, input=None, env=None):
    return subprocess.run([sys.executable, "-m", "blt_decode.cli", *args], capture_output=True, input=input,
                          env={**os.environ, **(env or {})})
