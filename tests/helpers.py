"""Helpers shared by test modules of several folders (tests/ is on sys.path through its conftest.py)."""

import json
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


# -- lm-eval task files (tests/evaluation, tests/serving) ----------------------------------------------------
MC = [{"question": "The capital of France is", "choices": [" Paris", " London", " Rome"], "answer": 0},
      {"question": "def add(a, b):\n    return", "choices": [" a + b", " a - b"], "answer": 1},
      {"question": "Two plus two is", "choices": [" four", " five"], "answer": 0}]
GEN = [{"prompt": "def f(x):\n", "target": "    return x"}, {"prompt": "To be, or not to be", "target": ", that"}]


def write_tasks(directory) -> None:
    """A multiple-choice likelihood task and a generate_until task over local JSONL files."""
    for name, rows in (("mc", MC), ("gen", GEN)):
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = "dataset_path: json\ntest_split: test\n"
    (directory / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {directory / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: \"{{answer}}\"\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    (directory / "tiny_gen.yaml").write_text(
        f"task: tiny_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {directory / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: \"{{prompt}}\"\ndoc_to_target: \"{{target}}\"\n"
        "generation_kwargs:\n  until: [\"\\n\\n\"]\n  max_gen_toks: 12\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
