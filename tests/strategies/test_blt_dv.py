"""BLT-DV is exactly greedy autoregressive decoding with the same model (float64, random tiny models),
whatever the diffusion drafts are: always right, always wrong, or random."""

from __future__ import annotations

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import blt_decode as bd
from blt_decode import testing
from blt_decode.checkpoints.resolve import with_config
from blt_decode.model.tokenizer import EOS_ID, OFFSET
from blt_decode.trace import Verified

alphas = st.one_of(st.none(), st.floats(0.0, 1.0))


@given(model=testing.tiny_models(), prompt=testing.prompts(), block_size=st.one_of(st.integers(2, 16), st.just("auto")),
       alpha=alphas, n=st.integers(0, 48))
def test_blt_dv_equals_greedy(model, prompt, block_size, alpha, n):
    testing.assert_same_output(model, prompt, "autoregressive", ("blt-dv", {"block_size": block_size, "alpha": alpha}),
                               max_new_bytes=n)


@settings(max_examples=max(5, settings.default.max_examples // 3))
@given(model=testing.tiny_models(eos=False), prompt=testing.prompts(max_size=8), block_size=st.sampled_from([4, 8, 16]),
       cut=st.tuples(st.integers(0, 25), st.integers(1, 3)))
def test_blt_dv_stops_at_stop_sequences_like_greedy(model, prompt, block_size, cut):
    reference = bd.generate(model, prompt, max_new_bytes=30).output
    lo, width = cut
    stop = reference[lo : lo + width] or b"\x00"
    ga, gb = testing.assert_same_output(model, prompt, "ar", ("blt-dv", {"block_size": block_size}),
                                        max_new_bytes=30, stop=[stop])
    assert ga.stats.stop_reason == gb.stats.stop_reason


def constant_model(seed: int = 0) -> bd.BLTModel:
    """A model whose decoder state at every position, clean or block, is a multiple of one vector: the
    encoder's byte embeddings are all equal, hash embeddings are zero, and every residual branch of the
    encoder and decoder outputs zero. Autoregressive steps and denoising passes then all predict the same
    byte, so every diffusion draft is right. Every byte starts a patch (threshold 0): how many patches close
    does not rest on what the random entropy model makes of a constant text (torch versions init it apart)."""
    base = bd.random_model("tiny", seed, dtype=torch.float64)
    model = with_config(base, attrs.evolve(base.config, patching_threshold=0.0))
    with torch.no_grad():
        emb = model.local_encoder.tok_embeddings.weight
        emb.copy_(emb[OFFSET + 65].expand_as(emb).clone())
        for table in model.encoder_hash_tok_embedding:
            table.weight.zero_()
        for layer in [*model.local_encoder.layers, *model.local_decoder.layers]:
            layer.attention.wo.weight.zero_()
            layer.feed_forward.w2.weight.zero_()
        for cross in model.local_decoder.cross_attn_layers:
            cross.wo.weight.zero_()
        z = model.local_decoder.output(model.local_decoder.norm(emb[:1]))[0]
        best = OFFSET + int(z[OFFSET:].argmax())
        model.local_decoder.output.weight[best] *= 50  # confident, so every alpha takes it in one pass
        model.local_decoder.output.weight[EOS_ID] = -model.local_decoder.output.weight[best]
    return model


@pytest.mark.parametrize("block_size,alpha", [(2, None), (4, 0.3), (8, None), (16, 0.9)])
def test_always_right_drafts_are_all_accepted(block_size, alpha):
    model = constant_model()
    n = 50
    ar = bd.generate(model, "always", max_new_bytes=n)
    assert ar.stats.stop_reason == "max_new_bytes" and len(set(ar.output)) == 1
    g = bd.generate(model, "always", strategy="blt-dv", block_size=block_size, alpha=alpha, max_new_bytes=n)
    assert g.output == ar.output
    assert g.stats.acceptance_rate == 1.0
    assert g.stats.verify_passes == g.stats.blocks
    # n bytes: each block commits block_size bytes, the exact first byte included (the last may be shorter)
    assert g.stats.blocks == -(-n // block_size)
    assert g.stats.denoise_passes == g.stats.blocks  # confident: one denoising pass per block
    if block_size >= 4:  # two passes (denoise + verify) per block: fewer than AR's one per byte
        assert g.stats.passes.decoder < ar.stats.passes.decoder
    assert g.stats.passes.global_ < ar.stats.passes.global_


def _wrong_denoiser(session, call, logits):
    """Every masked position points at a byte other than the exact greedy choice after the committed
    bytes and the block's (exact) first byte."""
    if call.kind != "denoise":
        return logits
    ids = torch.cat([session.ids[: session.length], torch.tensor(call.block[:1])])
    return testing.wrong_logits(session.model, ids, logits)


@pytest.fixture(scope="module")
def wrong_denoise_backend():
    backend = testing.RewritingBackend("wrong-denoise", "test double: eager execution with a denoiser that is always wrong",
                                       _wrong_denoiser)
    with testing.registered_backend(backend) as name:
        yield name


@settings(max_examples=max(5, settings.default.max_examples // 3))
@given(model=testing.tiny_models(), prompt=testing.prompts(max_size=10),
       block_size=st.one_of(st.integers(2, 8), st.just("auto")), alpha=alphas, n=st.integers(0, 20))
def test_always_wrong_drafts_still_equal_greedy(wrong_denoise_backend, model, prompt, block_size, alpha, n):
    ga = bd.generate(model, prompt, max_new_bytes=n)
    gw = bd.generate(model, prompt, strategy="blt-dv", block_size=block_size, alpha=alpha, max_new_bytes=n,
                     backend=wrong_denoise_backend)
    assert gw.output == ga.output
    assert gw.stats.accepted_bytes == 0


@pytest.mark.parametrize("bad", [{"block_size": 1}, {"block_size": 65}, {"block_size": True}, {"block_size": "big"},
                                 {"alpha": 1.5}, {"alpha": -0.1}, {"alpha": True}, {"alpha": float("nan")},
                                 {"temperature": -1.0}, {"temperature": float("inf")}, {"top_k": 0}, {"top_p": 2.0}])
def test_options_are_validated(bad):
    with pytest.raises(bd.InvalidOptionsError, match=f"'{next(iter(bad))}' must be"):
        bd.generate("random:tiny", "x", strategy="blt-dv", max_new_bytes=1, **bad)


@pytest.mark.parametrize("alpha", [None, 0.3])
def test_adaptive_block_grows_when_drafts_are_right(alpha):
    model = constant_model()
    ar = bd.generate(model, "always", max_new_bytes=120)
    g = bd.generate(model, "always", strategy="blt-dv", block_size="auto", alpha=alpha, max_new_bytes=120, trace=True)
    assert g.output == ar.output and g.stats.acceptance_rate == 1.0
    assert max(v.k for v in g.trace.of_type(Verified)) > 16  # block_size - 1 drafted bytes per round


@pytest.mark.parametrize("options", [{"block_size": 8}, {"block_size": 8, "alpha": None},
                                     {"block_size": 6, "temperature": 1.0}, {"block_size": "auto"}])
def test_a_drafted_eos_ends_the_draft(options):
    """Nothing after a drafted EOS could be committed: it is not verified (nor counted as drafted)."""
    base = bd.random_model("tiny", 4, dtype=torch.float64)
    with torch.no_grad():  # make EOS likely in the drafts as well as in the exact distribution
        base.local_decoder.output.weight[EOS_ID] = 3.0 * base.local_decoder.output.weight[ord("e") + OFFSET]
    seen_eos = 0
    for prompt in (b"ab", b"hello", b"xyz", b"q"):
        g = bd.generate(base, prompt, strategy="blt-dv", max_new_bytes=60, seed=1, trace=True, **options)
        for event in g.trace.events:
            if isinstance(event, Verified) and EOS_ID in event.drafted[1:]:
                seen_eos += 1
                assert event.drafted.index(EOS_ID, 1) == len(event.drafted) - 1, event
        if "temperature" not in options:
            assert g.output == bd.generate(base, prompt, max_new_bytes=60).output
    assert seen_eos, "no draft held an EOS: the test did not test anything"
