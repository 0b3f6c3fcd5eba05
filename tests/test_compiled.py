"""The compiled backend: same bytes as eager, and no recompiles for new lengths after warm-up.

torch.compile on a 2-core CPU takes a minute or two to warm up, so this module compiles once (one model,
module-scoped) and reuses the graphs."""

import contextlib
import io
import re

import pytest
import torch

import blt_decode as bd
from blt_decode import plugins
from blt_decode.backends.compiled import compiled_graph_count


@pytest.fixture(scope="module")
def warm():
    torch._dynamo.reset()
    model = bd.random_model("tiny", 21)
    shown = io.StringIO()
    with contextlib.redirect_stderr(shown):
        seconds = plugins.get_backend("compiled").warmup(model, progress=True)
    return model, seconds, shown.getvalue()


@pytest.mark.parametrize("strategy,options", [("autoregressive", {}), ("blt-s", {"k": 4}), ("blt-s", {"k": 8})])
def test_compiled_equals_eager(warm, strategy, options):
    model, _, _ = warm
    for prompt in ("def add(a, b):", "x"):
        eager = bd.generate(model, prompt, strategy=strategy, max_new_bytes=40, **options)
        compiled = bd.generate(model, prompt, strategy=strategy, backend="compiled", max_new_bytes=40, **options)
        assert compiled.output == eager.output
        assert compiled.stats.passes == eager.stats.passes


def test_no_recompiles_for_new_lengths_after_warmup(warm):
    model, seconds, shown = warm
    assert seconds > 0
    before = compiled_graph_count()
    assert before > 0  # the warm-up really compiled
    # and said so as it went: a bar counting the graphs, strategy by strategy (issue 22: 40-70 s of silence)
    assert "compiling stacks (autoregressive)" in shown and "compiling stacks (blt-s)" in shown
    counts = [int(n) for n in re.findall(r"compiling stacks \([\w-]+\):[: ]*(\d+) graphs", shown)]
    assert counts and max(counts) >= 1, shown[-500:]
    bd.generate(model, "a prompt of quite another length than the warm-up one", backend="compiled", max_new_bytes=57)
    bd.generate(model, "zz", strategy="blt-s", k=3, backend="compiled", max_new_bytes=33)
    assert compiled_graph_count() == before


def test_backend_is_listed():
    assert "compiled" in bd.backend_names()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: CUDA graphs (reduce-overhead) run only on a GPU")
def test_cuda_graphs_equal_eager_on_gpu():
    model = bd.random_model("tiny", 21).cuda()
    eager = bd.generate(model, "gpu", max_new_bytes=32)
    compiled = bd.generate(model, "gpu", backend="compiled", max_new_bytes=32)
    assert compiled.output == eager.output
