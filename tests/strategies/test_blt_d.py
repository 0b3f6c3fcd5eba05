"""BLT-D: the unmasking rules, the block loop (commit up to the last patch boundary) and its statistics."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import blt_decode
from blt_decode.decoding import options
from blt_decode.decoding.session import DecodeSession
from blt_decode.decoding.unmasking import select_confidence, select_entropy, unmask_step
from blt_decode.errors import InvalidOptionsError
from blt_decode.model.stacks import Stack
from blt_decode.model.tokenizer import MASK_ID
from blt_decode.plugins import registry as plugins


# -- the confidence rule -----------------------------------------------------------------------------
def test_confidence_unmasks_every_position_above_alpha():
    assert select_confidence([0.9, 0.5, 0.71, 0.7], 0.7) == [0, 2]


def test_confidence_falls_back_to_the_single_most_confident():
    assert select_confidence([0.2, 0.6, 0.4], 0.7) == [1]
    assert select_confidence([0.5, 0.5], 0.7) == [0]  # ties: the first


@given(st.lists(st.floats(0, 1), min_size=1, max_size=16), st.floats(0, 1))
def test_confidence_rule_properties(probs, alpha):
    chosen = select_confidence(probs, alpha)
    assert chosen and chosen == sorted(set(chosen))
    above = [i for i, p in enumerate(probs) if p > alpha]
    if above:
        assert chosen == above
    else:
        assert len(chosen) == 1 and probs[chosen[0]] == max(probs)


# -- the entropy rule --------------------------------------------------------------------------------
def test_entropy_takes_the_largest_low_entropy_set_within_gamma():
    # sorted: 0.1 (2), 0.3 (0), 0.5 (3), 2.0 (1): 0.1 + 0.3 + 0.5 = 0.9 <= 1.0, adding 2.0 exceeds
    assert select_entropy([0.3, 2.0, 0.1, 0.5], 1.0) == [0, 2, 3]
    assert select_entropy([0.3, 2.0, 0.1, 0.5], 0.4) == [0, 2]


def test_entropy_unmasks_at_least_one():
    assert select_entropy([1.5, 1.2, 3.0], 1.0) == [1]
    assert select_entropy([0.0, 0.0], 0.0) == [0, 1]


@given(st.lists(st.floats(0, 5), min_size=1, max_size=16), st.floats(0, 4))
def test_entropy_rule_properties(entropies, gamma):
    chosen = select_entropy(entropies, gamma)
    assert chosen and chosen == sorted(set(chosen))
    total = sum(entropies[i] for i in chosen)
    if len(chosen) > 1:
        assert total <= gamma + 1e-12
    # chosen positions are the lowest-entropy ones
    rest = [entropies[i] for i in range(len(entropies)) if i not in chosen]
    assert not rest or max(entropies[i] for i in chosen) <= min(rest)
    # maximal: one more position would exceed gamma
    if rest and (len(chosen) > 1 or entropies[chosen[0]] <= gamma):
        assert total + min(rest) > gamma


def test_unmask_step_uses_greedy_bytes_and_never_special_ids():
    logits = torch.full((4, 260), -10.0, dtype=torch.float64)
    logits[0, 70] = 10.0  # confident
    logits[1, MASK_ID] = 50.0  # the mask id itself must never be chosen
    logits[1, 80] = 0.0
    logits[2, 90:94] = 1.0  # unsure: four equally likely bytes
    logits[3, 100] = 10.0
    block = [MASK_ID, MASK_ID, MASK_ID, 55]
    picked, confidences = unmask_step(block, logits, "confidence", 0.7, 1.0, fill_all=False)
    assert picked == [0, 1] and all(c > 0.7 for c in confidences)  # position 1's top probability (special ids removed) is ~1 too
    assert block == [70, 80, MASK_ID, 55]
    unmask_step(block, logits, "confidence", 0.99999, 1.0, fill_all=True)
    assert block == [70, 80, 90, 55]


# -- the strategy ------------------------------------------------------------------------------------
def _model(seed=0):
    return blt_decode.random_model("tiny", seed, dtype=torch.float64)


def test_registered_with_options():
    s = plugins.get_strategy("blt-d")
    assert plugins.get_strategy("blt_d") is s
    opts = options.make_options(s, {"block_size": 16, "rule": "entropy", "gamma": 0.8})
    assert (opts.block_size, opts.rule, opts.gamma) == (16, "entropy", 0.8)
    for bad in ({"block_size": 0}, {"rule": "random"}, {"alpha": 1.5}, {"gamma": -1}, {"max_passes": 0}):
        with pytest.raises(InvalidOptionsError):
            options.make_options(s, bad)


@pytest.mark.parametrize("block_size,rule", [(4, "confidence"), (8, "entropy"), (16, "confidence")])
def test_blocks_commit_up_to_the_last_patch_boundary(block_size, rule):
    from blt_decode.decoding.protocol import DecodeContext

    model = _model(1)
    strategy = plugins.get_strategy("blt-d")
    opts = options.make_options(strategy, {"block_size": block_size, "rule": rule})
    prompt = blt_decode.model.tokenizer.encode(b"def fibonacci(n):\n")
    session = DecodeSession(model, len(prompt) + 80 + block_size + 1)
    context = DecodeContext(tuple(prompt), 80, torch.Generator().manual_seed(0))
    ends, total = [], len(prompt)
    decoder = strategy.decode(session, context, opts)
    while total < len(prompt) + 80:
        chunk = next(decoder)
        total += len(chunk)
        ends.append((total, len(chunk)))
        assert session.length == total
    decoder.close()
    starts = set(session.starts)
    for end, length in ends:
        assert 1 <= length <= block_size
        # a block ends at a patch start (the last one inside it), or is a whole block without any
        assert end in starts or length == block_size, (end, length, sorted(starts))
        if end in starts and length < block_size:
            continue
    stats = session.stats
    assert stats.blocks == len(ends) and stats.drafted_bytes == len(ends) * block_size
    assert stats.accepted_bytes == total - len(prompt)
    assert 1 <= stats.denoise_passes / stats.blocks <= block_size
    # decoder passes: the denoising passes + one append per block + the prefill
    assert stats.passes[Stack.DECODER] == stats.denoise_passes + stats.blocks + 1
    assert stats.passes[Stack.GLOBAL] <= stats.blocks + 1


def test_one_pass_per_block_when_alpha_is_zero_and_max_passes_caps():
    model = _model(2)
    g = blt_decode.generate(model, "x = ", strategy="blt-d", max_new_bytes=40, block_size=8, alpha=0.0)
    assert g.stats.denoise_passes == g.stats.blocks  # every position beats probability 0
    g = blt_decode.generate(model, "x = ", strategy="blt-d", max_new_bytes=40, block_size=8, alpha=1.0, max_passes=2)
    assert g.stats.denoise_passes <= 2 * g.stats.blocks
    g = blt_decode.generate(model, "x = ", strategy="blt-d", max_new_bytes=40, block_size=8, alpha=1.0)
    assert g.stats.denoise_passes == 8 * g.stats.blocks  # alpha=1: one position per pass


def test_stops_at_eos_stop_sequences_and_max_new_bytes():
    from blt_decode.testing import with_eos_for_byte

    model = _model(3)
    free = blt_decode.generate(model, "abc", strategy="blt-d", max_new_bytes=50, block_size=4)
    assert len(free.output) == 50 and free.stats.stop_reason == "max_new_bytes"
    byte = free.output[7]
    eos_model = with_eos_for_byte(model, byte)
    g = blt_decode.generate(eos_model, "abc", strategy="blt-d", max_new_bytes=50, block_size=4)
    assert g.stats.stop_reason == "eos" and bytes([byte]) not in g.output
    stop = free.output[10:12]
    g = blt_decode.generate(model, "abc", strategy="blt-d", max_new_bytes=50, block_size=4, stop=[stop])
    assert g.stats.stop_reason == "stop_sequence" and g.output.endswith(stop)


def test_block_mask_denoise_is_independent_of_later_scratch():
    """Denoising twice from the same state gives the same logits (scratch keys never leak)."""
    model = _model(4)
    session = DecodeSession(model, 64)
    session.prefill(blt_decode.model.tokenizer.encode(b"hello world"))
    a = session.denoise([MASK_ID] * 6)
    session.denoise([77] * 8)
    b = session.denoise([MASK_ID] * 6)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert session.stats.denoise_passes == 3 and session.stats.passes[Stack.DECODER] == 4
