"""BLT-S is exactly greedy autoregressive decoding (float64, random tiny models), and counts honestly."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import blt_decode as bd
from blt_decode import testing
from blt_decode.trace import Verified


@given(model=testing.tiny_models(), prompt=testing.prompts(), k=st.one_of(st.integers(1, 16), st.just("auto")),
       n=st.integers(0, 48))
def test_blt_s_equals_greedy(model, prompt, k, n):
    testing.assert_same_output(model, prompt, "autoregressive", ("blt-s", {"k": k}), max_new_bytes=n)


@given(model=testing.tiny_models(eos=False), prompt=testing.prompts(max_size=8),
       k=st.one_of(st.integers(1, 8), st.just("auto")), cut=st.tuples(st.integers(0, 25), st.integers(1, 3)))
def test_blt_s_stops_at_stop_sequences_like_greedy(model, prompt, k, cut):
    reference = bd.generate(model, prompt, max_new_bytes=30).output
    lo, width = cut
    stop = reference[lo : lo + width] or b"\x00"
    ga, gb = testing.assert_same_output(model, prompt, "ar", ("blt-s", {"k": k}), max_new_bytes=30, stop=[stop])
    assert ga.stats.stop_reason == gb.stats.stop_reason


def latent_blind(model):
    """The same model with the decoder's cross-attention output zeroed: the decoder ignores latents, so a
    draft with a stale latent is always right."""
    copy = testing.with_eos_for_byte(model, 0)
    copy.load_state_dict(model.state_dict())
    with torch.no_grad():
        for layer in copy.local_decoder.cross_attn_layers:
            layer.wo.weight.zero_()
    return copy


@pytest.mark.parametrize("k", [1, 4, 8])
def test_always_accepted_drafts(k):
    model = latent_blind(bd.random_model("tiny", 11, dtype=torch.float64))
    n = 45
    ar = bd.generate(model, "accept", max_new_bytes=n)
    assert ar.stats.stop_reason == "max_new_bytes"  # the check below needs a full-length run
    g = bd.generate(model, "accept", strategy="blt-s", k=k, max_new_bytes=n)
    assert g.output == ar.output
    assert g.stats.acceptance_rate == 1.0
    assert g.stats.verify_passes == math.ceil((n - 1) / (k + 1))  # the last byte needs no verification
    assert g.stats.passes.global_ <= g.stats.verify_passes + 1  # prefill + one per round


# the wrong drafter runs an uncached forward per draft step: a third of the profile's examples
@settings(max_examples=max(5, settings.default.max_examples // 3))
@given(model=testing.tiny_models(), prompt=testing.prompts(max_size=10), k=st.one_of(st.integers(1, 6), st.just("auto")),
       n=st.integers(0, 20))
def test_never_accepted_drafts_still_equal_greedy(wrong_draft_backend, model, prompt, k, n):
    ga, gb = testing.assert_same_output(model, prompt, "ar", ("blt-s", {"k": k}), max_new_bytes=n)
    gw = bd.generate(model, prompt, strategy="blt-s", k=k, max_new_bytes=n, backend=wrong_draft_backend)
    assert gw.output == ga.output
    assert gw.stats.accepted_bytes == 0


def test_blt_s_saves_global_passes_when_acceptance_is_high():
    model = latent_blind(bd.random_model("tiny", 3, dtype=torch.float64))
    ar = bd.generate(model, "def f(x):", max_new_bytes=80)
    s = bd.generate(model, "def f(x):", strategy="blt-s", k=8, max_new_bytes=80)
    assert s.output == ar.output
    assert s.stats.passes.global_ < ar.stats.passes.global_
    assert s.stats.passes.patcher < ar.stats.passes.patcher
    assert s.stats.bandwidth_gb < ar.stats.bandwidth_gb


@pytest.mark.parametrize("bad", [0, 65, 2.5, True, "fast", None])
def test_k_is_validated(bad):
    with pytest.raises(bd.InvalidOptionsError, match=r"'k' must be an integer in 1\.\.64 or 'auto'"):
        bd.generate("random:tiny", "x", strategy="blt-s", k=bad, max_new_bytes=1)


@pytest.mark.parametrize("bad,option", [
    ({"temperature": -0.1}, "temperature"), ({"temperature": float("inf")}, "temperature"),
    ({"temperature": float("nan")}, "temperature"), ({"temperature": True}, "temperature"),
    ({"top_k": 0}, "top_k"), ({"top_k": True}, "top_k"), ({"top_k": 2.0}, "top_k"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_p": float("nan")}, "top_p"), ({"top_p": False}, "top_p"),
])
def test_sampling_options_are_validated(bad, option):
    with pytest.raises(bd.InvalidOptionsError, match=f"'{option}' must be"):
        bd.generate("random:tiny", "x", strategy="blt-s", max_new_bytes=1, **bad)


def test_k_auto_from_the_command_line():
    from blt_decode.cli import main

    assert main(["generate", "x", "--model", "random:tiny", "--strategy", "blt-s", "-o", "k=auto",
                 "-o", "temperature=0.8", "--max-new-bytes", "8", "--seed", "1", "--json"]) == 0


def test_k_auto_drafts_long_when_drafts_are_right():
    """With every draft right (latent-blind decoder) the chosen k grows to the cap, so auto needs fewer
    verification passes than k=8; with drafts that are mostly wrong it stays short."""
    blind = latent_blind(bd.random_model("tiny", 11, dtype=torch.float64))
    g = bd.generate(blind, "accept", strategy="blt-s", k="auto", max_new_bytes=200, trace=True)
    fixed = bd.generate(blind, "accept", strategy="blt-s", k=8, max_new_bytes=200)
    assert g.output == fixed.output
    ks = [v.k for v in g.trace.of_type(Verified)]
    assert max(ks) > 16 and g.stats.verify_passes < fixed.stats.verify_passes
    random = bd.generate(bd.random_model("tiny", 0, dtype=torch.float64), "def f(x):", strategy="blt-s", k="auto",
                         max_new_bytes=200, trace=True)
    ks = [v.k for v in random.trace.of_type(Verified)]
    assert sorted(ks)[len(ks) // 2] <= 4  # acceptance ~0.3: short drafts
