"""The model's two forward paths agree; patching is causal; the session counts what it runs."""

import attrs
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import blt_decode as bd
from blt_decode import testing
from blt_decode.decoding.session import DecodeSession
from blt_decode.errors import ConfigError
from blt_decode.model import tokenizer
from blt_decode.model.blt import latent_index
from blt_decode.model.config import BLTConfig, TransformerConfig
from blt_decode.model.presets import BLT_PRESETS
from blt_decode.model.patching import Patcher, patch_lengths


def ids_of(prompt: bytes) -> list[int]:
    return tokenizer.encode(prompt)


@given(model=testing.tiny_models(eos=False), data=st.binary(min_size=1, max_size=40), split=st.integers(1, 40),
       chunk=st.integers(1, 5))
def test_cached_chunks_equal_reference_forward(model, data, split, chunk):
    ids = ids_of(data)
    ref = model(torch.tensor([ids]))[0]
    session = DecodeSession(model, len(ids) + 1)
    split = min(split, len(ids))
    parts = [session.prefill(ids[:split])]
    for lo in range(split, len(ids), chunk):
        parts.append(session.append(ids[lo : lo + chunk]))
    got = torch.cat(parts)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)
    assert session.starts == list(model.patch_layout(torch.tensor([ids])).starts[0])


@given(model=testing.tiny_models(), prompt=testing.prompts(), n=st.integers(0, 24))
def test_cached_greedy_equals_uncached_greedy(model, prompt, n):
    testing.assert_same_output(model, prompt, ("ar", {"cache": "kv"}), ("ar", {"cache": "none"}), max_new_bytes=n)


@given(model=testing.tiny_models(eos=False), data=st.binary(min_size=2, max_size=30), cut=st.integers(1, 30))
def test_truncate_then_reappend_restores_state(model, data, cut):
    ids = ids_of(data)
    cut = min(cut, len(ids) - 1)
    session = DecodeSession(model, len(ids) + 4)
    full = session.prefill(ids)
    starts = list(session.starts)
    latents = session.state.latents[0, : session.closed_patches].clone()
    session.truncate(cut)
    again = session.append(ids[cut:])
    torch.testing.assert_close(again, full[cut:], rtol=1e-9, atol=1e-9)
    assert session.starts == starts
    # the global model re-ran only over patches closed after the cut, and agrees with the first run
    torch.testing.assert_close(session.state.latents[0, : session.closed_patches], latents, rtol=1e-9, atol=1e-9)


@given(model=testing.tiny_models(eos=False), data=st.binary(min_size=1, max_size=30), more=st.binary(min_size=1, max_size=10))
def test_patch_boundaries_are_causal(model, data, more):
    short = model.patch_layout(torch.tensor([ids_of(data)])).starts[0]
    long = model.patch_layout(torch.tensor([ids_of(data + more)])).starts[0]
    assert list(long[: len(short)]) == list(short)
    assert short[:2] == (0, 1)


def test_patcher_rules():
    p = Patcher(threshold=1.0, max_patch_length=3)
    #           t: 0    1    2    3    4    5    6    7
    entropies = [9.0, 0.1, 2.0, 0.1, 0.1, 0.1, 0.1, 2.0]
    starts = p.patch_starts(8, entropies)
    # 0 and 1 always; H(2) > θ -> 3; max length 3 -> 6; H(7) > θ -> 8 (the trailing empty patch)
    assert starts == [0, 1, 3, 6, 8]
    assert patch_lengths(starts, 8) == [1, 2, 3, 2, 0]
    assert Patcher(threshold=None, max_patch_length=2).patch_starts(6) == [0, 1, 3, 5]


def test_alignment_rule():
    starts = [0, 1, 4, 8]  # patches [0], [1..3], [4..7], and a closed last patch (next byte starts one)
    # position t reads the latent of the patch before the one holding t+1
    assert [latent_index(starts, t) for t in range(8)] == [0, 0, 0, 1, 1, 1, 1, 2]


def test_forward_pass_counts_for_cached_generation():
    model = bd.load_model("random:tiny:3", dtype=torch.float64)
    g = bd.generate(model, "count me", max_new_bytes=40)
    session = DecodeSession(model, 64)
    session.prefill(ids_of(b"count me"))
    prompt_patches = session.closed_patches
    passes = g.stats.passes
    assert passes.decoder == g.stats.new_tokens  # one decoder pass per generated token
    assert passes.encoder == passes.decoder and passes.patcher == passes.decoder
    # one global pass for the whole prompt, then one per patch closed while generating
    assert passes.global_ == 1 + (g.stats.patches - prompt_patches)
    assert passes.global_ < passes.decoder


def test_uncached_counts_every_module_every_byte():
    g = bd.generate("random:tiny", "x", max_new_bytes=10, cache="none")
    p = g.stats.passes
    assert p.decoder == p.global_ == p.encoder == g.stats.new_tokens


def test_draft_equals_exact_logits_while_no_patch_closes():
    model = bd.load_model("random:tiny:1", dtype=torch.float64)
    model = bd.api.with_config(model, attrs.evolve(model.config, patching_threshold=1e9))  # only BOS patch
    ids = ids_of(b"drafting")
    session = DecodeSession(model, 32)
    session.prefill(ids)
    drafted = session.draft([70, 71, 72])
    session.truncate(len(ids))
    exact = session.append([70, 71, 72])
    torch.testing.assert_close(drafted, exact, rtol=1e-12, atol=1e-12)


def test_stream_chunks_join_to_generate_output():
    model = bd.load_model("random:tiny:2")
    s = bd.stream(model, "abc", max_new_bytes=25, seed=1)
    chunks = list(s)
    g = bd.generate(model, "abc", max_new_bytes=25, seed=1)
    assert b"".join(chunks) == g.output == s.output
    assert s.stats.new_bytes == len(g.output)


def test_score_agrees_with_reference_forward():
    model = bd.load_model("random:tiny:4", dtype=torch.float64)
    data = b"score these bytes"
    s = bd.score(model, data)
    ids = torch.tensor([ids_of(data)])
    logp = torch.log_softmax(model(ids)[0], -1)
    expected = [float(logp[i, ids[0, i + 1]].detach()) for i in range(len(data))]
    assert s.logprobs.tolist() == pytest.approx(expected, rel=1e-12)
    assert s.bits_per_byte == pytest.approx(-sum(expected) / len(data) / 0.6931471805599453)
    chunked = bd.score(model, data, chunk_bytes=5)
    assert len(chunked.logprobs) == len(data)
    assert chunked.logprobs[:5].tolist() == pytest.approx(bd.score(model, data[:5]).logprobs.tolist())


def test_random_presets_keep_blt_proportions():
    for name in ("tiny", "small"):  # the random-model shapes small enough to build here
        counts = bd.random_model(name).param_counts()
        assert counts.global_ > counts.encoder + counts.decoder, name


def test_a_preset_name_is_one_shape_for_random_models_and_training():
    from blt_decode.training import blt_preset

    for name in ("tiny", "small"):
        random_config = bd.load_model(f"random:{name}").config
        # a random model's threshold is calibrated to its weights; every other field is the preset's
        assert attrs.evolve(random_config, patching_threshold=0.0) == attrs.evolve(blt_preset(name), patching_threshold=0.0)


def test_random_model_threshold_gives_requested_mean_patch_length():
    model = bd.random_model("tiny", 0, mean_patch_length=4.0)
    ids = torch.tensor([ids_of(bd.checkpoints.resolve._CALIBRATION_TEXT)])
    starts = model.patch_layout(ids).starts[0]
    mean = (ids.shape[1] - 1) / (len(starts) - 1)
    assert 3.0 < mean < 5.5


def test_config_errors_name_the_field():
    stack = TransformerConfig(dim=16, n_layers=1, n_heads=2, ffn_dim=32)
    with pytest.raises(ConfigError, match="n_heads"):
        TransformerConfig(dim=16, n_layers=1, n_heads=3, ffn_dim=32)
    with pytest.raises(ConfigError, match="entropy_model"):
        BLTConfig(encoder=stack, global_=stack, decoder=stack)
    with pytest.raises(ConfigError, match="max_patch_length"):
        BLTConfig(encoder=stack, global_=stack, decoder=stack, patching_mode="static")
    with pytest.raises(ConfigError, match="unknown config field"):
        BLTConfig.from_dict({**BLT_PRESETS["tiny"].to_dict(), "bogus": 1})


def test_prompt_too_long_says_the_limit():
    model = bd.load_model("random:tiny")
    limit = model.config.max_seqlen
    with pytest.raises(bd.PromptTooLongError, match=str(limit)):
        bd.generate(model, b"x" * limit, max_new_bytes=1)


def test_sessions_do_not_leak_between_prompts():
    model = bd.load_model("random:tiny:5", dtype=torch.float64)
    alone = bd.generate(model, "second prompt", max_new_bytes=20).output
    bd.generate(model, "first prompt, long enough to fill caches", max_new_bytes=30)
    assert bd.generate(model, "second prompt", max_new_bytes=20).output == alone


@pytest.mark.parametrize("data,chunk,words", [(b"", None, "at least one byte"), (b"abc", 0, "chunk_bytes"),
                                              (b"abc", True, "chunk_bytes"), (b"abc", 1.5, "chunk_bytes"),
                                              (b"abc", 10**6, "chunk_bytes")])
def test_score_rejects_bad_input_with_a_typed_error(data, chunk, words):
    with pytest.raises(bd.InvalidRequestError, match=words):
        bd.score(bd.random_model("tiny"), data, chunk_bytes=chunk)
