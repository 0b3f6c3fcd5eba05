"""score / score_many: batched scoring equals scoring alone; greedy flags and top alternatives agree with
what greedy decoding does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import blt_decode as bd
from blt_decode.model import tokenizer
@pytest.fixture(scope="module")
def model():
    return bd.random_model("tiny", 4, dtype=torch.float64)


TEXTS = [b"a", b"hello world, this is a longer text", "def f(x):\n    return x", "\u00fcn\u00efcode", b"\xff\xfe raw"]


def test_score_many_equals_each_text_scored_alone(model):
    many = bd.score_many(model, TEXTS, batch_size=3, top_logprobs=4)
    assert len(many) == len(TEXTS)
    for text, batched in zip(TEXTS, many):
        alone = bd.score(model, text, top_logprobs=4)
        assert len(batched.logprobs) == len(tokenizer.to_bytes(text))
        np.testing.assert_allclose(batched.logprobs, alone.logprobs, rtol=0, atol=1e-12)
        assert (batched.greedy == alone.greedy).all()
        assert (batched.top_ids == alone.top_ids).all()
        assert batched.bits_per_byte == pytest.approx(alone.bits_per_byte, rel=1e-12)


def test_greedy_output_is_greedy_everywhere_and_top_ids_rank_it_first(model):
    prompt = b"def fib(n):"
    g = bd.generate(model, prompt, max_new_bytes=30)
    assert g.stats.stop_reason == "max_new_bytes"
    s = bd.score(model, prompt + g.output, top_logprobs=3)
    assert s.greedy[len(prompt):].all()  # every byte greedy decoding wrote is the greedy choice
    ids = np.frombuffer(prompt + g.output, dtype=np.uint8).astype(np.int64) + tokenizer.OFFSET
    assert ((s.top_ids[:, 0] == ids) == s.greedy).all()
    assert (np.diff(s.top_logprobs, axis=1) <= 0).all()  # best first
    assert (s.top_logprobs[:, 0] >= s.logprobs - 1e-12).all()
    assert not np.isin(s.top_ids, [tokenizer.BOS_ID, tokenizer.PAD_ID, tokenizer.BOE_ID]).any()


def test_chunked_score_batches_its_chunks_without_changing_them(model):
    data = b"0123456789abcdefghij" * 3
    chunked = bd.score(model, data, chunk_bytes=7, batch_size=4)
    pieces = [bd.score(model, data[lo:lo + 7]) for lo in range(0, len(data), 7)]
    np.testing.assert_allclose(chunked.logprobs, np.concatenate([p.logprobs for p in pieces]), atol=1e-12)
    assert chunked.greedy.shape == chunked.logprobs.shape and chunked.top_ids is None


@pytest.mark.parametrize("call,words", [
    (lambda m: bd.score_many(m, [b"ok", b""]), "text 1 has 0 bytes"),
    (lambda m: bd.score_many(m, [b"x" * m.config.max_seqlen]), "score takes 1..2047 bytes"),
    (lambda m: bd.score_many(m, [b"ok"], batch_size=0), "batch_size"),
    (lambda m: bd.score(m, b"ok", top_logprobs=21), "top_logprobs must be an integer in 0..20"),
    (lambda m: bd.score(m, b"ok", top_logprobs=True), "top_logprobs"),
    (lambda m: bd.score_many(m, [3]), "text 0: expected str or bytes"),
])
def test_bad_scoring_input_is_a_typed_error(model, call, words):
    with pytest.raises(bd.InvalidRequestError, match=words):
        call(model)
