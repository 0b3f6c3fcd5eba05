"""Speculative sampling in BLT-S and BLT-DV is *exactly* autoregressive sampling (float64, random tiny
models): the distribution of the first bytes, computed in closed form by enumerating every branch of the
implementation's random draws (``testing.output_distribution``), equals autoregressive sampling's
distribution computed from the reference forward, to 1e-9; and G-tests on longer outputs, with fixed
seeds, do not reject it (while they do reject a broken accept rule)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import blt_decode as bd
from blt_decode import testing
from blt_decode.model.tokenizer import EOS_ID, OFFSET

TOLERANCE = 1e-9


def support_mask(model: bd.BLTModel, ids) -> torch.Tensor:
    mask = torch.full((model.config.vocab_size,), float("-inf"), dtype=model.dtype)
    mask[list(ids)] = 0.0
    return mask


class SupportBackend(testing.RewritingBackend):
    """Every logits row restricted to a few ids (-inf elsewhere): the model's distributions then have a
    support small enough to enumerate every branch of a sampler."""

    def __init__(self):
        super().__init__("small-support", "test double: eager execution, logits restricted to a few ids", self._restrict)
        self.ids: tuple[int, ...] = ()

    def _restrict(self, session, call, logits):
        return logits + support_mask(session.model, self.ids)


@pytest.fixture(scope="module")
def support_backend():
    backend = SupportBackend()
    with testing.registered_backend(backend):
        yield backend


def assert_exactly_ar(model, prompt, strategy, options, n, backend, ids):
    """The strategy's closed-form output distribution (first ``n`` bytes) equals AR sampling's."""
    backend.ids = tuple(ids)
    sampler = {k: options[k] for k in ("temperature", "top_k", "top_p") if k in options}
    mask = support_mask(model, ids)
    expected = testing.ar_output_distribution(model, prompt, n, logits_transform=lambda x: x + mask, **sampler)
    got, pruned = testing.output_distribution(model, prompt, strategy, n, backend=backend.name, **options)
    assert pruned < 1e-10
    assert abs(sum(got.values()) + pruned - 1.0) < 1e-12
    assert abs(sum(expected.values()) - 1.0) < 1e-12
    diff = testing.max_difference(got, expected)
    assert diff <= TOLERANCE + pruned, (strategy, options, diff, sorted(got.items())[:5], sorted(expected.items())[:5])
    return got


BYTES = [OFFSET + b for b in b"ab\n"]  # three bytes
WITH_EOS = [*BYTES[:2], EOS_ID]  # two bytes and EOS


@pytest.fixture(scope="module")
def model():
    return bd.random_model("tiny", 5, dtype=torch.float64)


def test_enumerated_ar_sampling_matches_the_reference_forward(model, support_backend):
    """The harness itself: enumerating the autoregressive strategy's draws gives the closed form."""
    for options in ({"temperature": 1.0}, {"temperature": 0.6, "top_k": 2}):
        assert_exactly_ar(model, "ab", "ar", options, 3, support_backend, BYTES)


@pytest.mark.parametrize("options,n,ids", [
    ({"k": 1, "temperature": 1.0}, 3, BYTES),
    ({"k": 2, "temperature": 1.0}, 3, BYTES),
    ({"k": 4, "temperature": 0.7}, 3, WITH_EOS),
    ({"k": 2, "temperature": 1.5, "top_k": 2}, 3, BYTES),
    ({"k": 3, "temperature": 1.0, "top_p": 0.7}, 3, BYTES),
    ({"k": "auto", "temperature": 1.0}, 3, BYTES),
    ({"k": 1, "temperature": 1.0}, 2, [OFFSET + b for b in b"abcd"]),
])
def test_blt_s_first_bytes_are_distributed_exactly_as_ar(model, support_backend, options, n, ids):
    got = assert_exactly_ar(model, "ab", "blt-s", options, n, support_backend, ids)
    assert len(got) > 3  # a real distribution, not a point mass


CODE = [OFFSET + b for b in b' "\n']  # what the default model continues code with (indentation, a docstring)


@pytest.mark.parametrize("options,n,ids", [
    ({"block_size": 2, "temperature": 1.0}, 3, CODE),
    ({"block_size": 3, "temperature": 1.0, "alpha": None}, 3, CODE),
    ({"block_size": 3, "temperature": 0.8, "alpha": 0.3}, 3, [*CODE[:2], EOS_ID]),
    ({"block_size": 4, "temperature": 1.0, "alpha": 0.5, "top_k": 2}, 3, CODE),
    ({"block_size": 3, "temperature": 2.0, "alpha": 0.0, "top_p": 0.999}, 3, CODE),
    ({"block_size": "auto", "temperature": 1.0}, 3, CODE),
])
def test_blt_dv_first_bytes_are_distributed_exactly_as_ar(support_backend, options, n, ids):
    model = bd.load_model("default").to(torch.float64)  # a real BLT-D model: its drafts are sometimes right
    got = assert_exactly_ar(model, "def f(x):\n", "blt-dv", options, n, support_backend, ids)
    assert len(got) > 3


@settings(max_examples=max(3, settings.default.max_examples // 5))
@given(model=testing.tiny_models(eos=False), prompt=testing.prompts(max_size=6),
       strategy=st.sampled_from(["blt-s", "blt-dv"]), size=st.one_of(st.integers(1, 4), st.just("auto")),
       temperature=st.sampled_from([0.5, 1.0, 2.0]), top=st.sampled_from([{}, {"top_k": 2}, {"top_p": 0.6}]),
       alpha=st.one_of(st.none(), st.floats(0.0, 1.0)), ids=st.lists(st.integers(OFFSET, 259), min_size=2, max_size=3,
                                                                       unique=True), eos=st.booleans())
def test_speculative_sampling_is_exact_on_random_models(support_backend, model, prompt, strategy, size, temperature,
                                                        top, alpha, ids, eos):
    if strategy == "blt-s":
        options = {"k": size}
    else:
        options = {"block_size": size if size == "auto" else size + 1, "alpha": alpha}
    options.update(temperature=temperature, **top)
    assert_exactly_ar(model, prompt, strategy, options, 3, support_backend, ids + ([EOS_ID] if eos else []))


class AcceptEverything:
    """A broken accept rule: every drafted byte is kept, so the output follows the draft distribution."""

    @staticmethod
    def bernoulli(prob, generator=None):
        return True


def test_the_exact_test_detects_a_broken_rule(model, support_backend, monkeypatch):
    import blt_decode.decoding.speculation

    support_backend.ids = tuple(BYTES)
    mask = support_mask(model, BYTES)
    expected = testing.ar_output_distribution(model, "ab", 3, temperature=1.0, logits_transform=lambda x: x + mask)
    monkeypatch.setattr(blt_decode.decoding.speculation, "sampling", AcceptEverything)
    got, _ = testing.output_distribution(model, "ab", "blt-s", 3, backend=support_backend.name, k=2, temperature=1.0)
    assert testing.max_difference(got, expected) > 1e-3


# -- statistical tests on longer outputs --------------------------------------------------------------
def sample_outputs(model, prompt, strategy, options, n, seeds, backend):
    counts: dict = {}
    for seed in seeds:
        g = bd.generate(model, prompt, strategy=strategy, backend=backend, max_new_bytes=n, seed=seed, **options)
        key = (g.output, g.stats.stop_reason == "eos")
        counts[key] = counts.get(key, 0) + 1
    return counts


def marginal(dist, position):
    out: dict = {}
    for (text, eos), p in dist.items():
        key = text[position] if position < len(text) else ("eos" if eos else "end")
        out[key] = out.get(key, 0) + p
    return out


def fit_p_value(model, prompt, strategy, options, n, seeds, backend, ids):
    """The smallest Bonferroni-corrected G-test p-value of sampled outputs against AR sampling's exact
    distribution: the whole output (rare outputs pooled) and the byte at every position."""
    backend.ids = tuple(ids)
    mask = support_mask(model, ids)
    sampler = {k: options[k] for k in ("temperature", "top_k", "top_p") if k in options}
    exact = testing.ar_output_distribution(model, prompt, n, logits_transform=lambda x: x + mask, **sampler)
    counts = sample_outputs(model, prompt, strategy, options, n, seeds, backend.name)
    tests = [(counts, exact)] + [
        ({k: v for k, v in marginal({key: c for key, c in counts.items()}, i).items()}, marginal(exact, i)) for i in range(n)
    ]
    p_values = [testing.g_test(observed, expected)[2] for observed, expected in tests]
    return min(1.0, min(p_values) * len(p_values))


def small_model(seed: int, patching: str) -> bd.BLTModel:
    """A random model small enough to sample thousands of outputs quickly; short patches, so that
    drafts often cross a boundary (where BLT-S's stale-latent q differs from p)."""
    local = bd.TransformerConfig(dim=16, n_layers=1, n_heads=2, ffn_dim=32)
    config = bd.BLTConfig(
        encoder=local, decoder=local, global_=bd.TransformerConfig(dim=16, n_layers=1, n_heads=2, ffn_dim=32),
        entropy_model=bd.TransformerConfig(dim=8, n_layers=1, n_heads=1, ffn_dim=16) if patching == "entropy" else None,
        encoder_hash_byte_group_size=(2, 3), encoder_hash_byte_group_vocab=31, patching_mode=patching,
        max_patch_length=None if patching == "entropy" else 2, max_seqlen=64,
    )
    model = bd.random_model(config, seed, mean_patch_length=2.0, dtype=torch.float64)
    with torch.no_grad():  # make the decoder lean on the latent, so that a stale latent's q differs from p
        for layer in model.local_decoder.cross_attn_layers:
            layer.wo.weight.mul_(4.0)
    return model


LONG = 8  # bytes per output: 3^8 = 6561 outputs, whose exact probabilities one batched forward per length gives
SIGNIFICANCE = 1e-3
STATISTICAL_CASES = [  # (strategy, options, patching, model seed)
    ("blt-s", {"k": 3, "temperature": 1.0}, "entropy", 2),
    ("blt-s", {"k": "auto", "temperature": 0.7, "top_k": 2}, "static", 1),
    ("blt-dv", {"block_size": 4, "temperature": 1.0, "alpha": 0.3}, "entropy", 1),
    ("blt-dv", {"block_size": "auto", "temperature": 1.5, "top_p": 0.9, "alpha": None}, "static", 2),
]


@pytest.mark.parametrize("strategy,options,patching,seed", STATISTICAL_CASES)
def test_longer_outputs_fit_ar_sampling(support_backend, strategy, options, patching, seed):
    """G-tests at a fixed significance on 1000 outputs of 8 bytes (fixed seeds 0..999: deterministic)."""
    p = fit_p_value(small_model(seed, patching), "ab", strategy, options, LONG, range(1000), support_backend, BYTES)
    assert p > SIGNIFICANCE


def test_the_g_test_rejects_a_broken_rule(support_backend, monkeypatch):
    """The first case above, with every draft accepted: its output follows q, and the test sees it."""
    import blt_decode.decoding.speculation

    monkeypatch.setattr(blt_decode.decoding.speculation, "sampling", AcceptEverything)
    p = fit_p_value(small_model(2, "entropy"), "ab", "blt-s", {"k": 3, "temperature": 1.0}, LONG, range(1000),
                    support_backend, BYTES)
    assert p < SIGNIFICANCE


@pytest.fixture
def slow_selected(request):
    """Run only when asked for (``pytest -m slow``): the repository's CI runs plain ``pytest``."""
    if "slow" not in (request.config.getoption("markexpr") or "").replace("not slow", ""):
        pytest.skip("long statistical check (about 7 minutes): run it with -m slow")


@pytest.mark.slow
@pytest.mark.parametrize("strategy,options,patching,seed", STATISTICAL_CASES)
def test_longer_outputs_fit_ar_sampling_many_seeds(slow_selected, support_backend, strategy, options, patching, seed):
    """The same with 5 000 outputs of 10 bytes, on two models."""
    for model_seed in (seed, seed + 10):
        p = fit_p_value(small_model(model_seed, patching), "ab", strategy, options, 10, range(5_000), support_backend,
                        BYTES)
        assert p > SIGNIFICANCE
