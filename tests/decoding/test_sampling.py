import pytest
import torch

import blt_decode as bd
from blt_decode.decoding.sampling import greedy_id, sample_id
from blt_decode.model.tokenizer import BOS_ID, EOS_ID


def test_greedy_never_picks_non_generable_specials():
    logits = torch.zeros(260)
    logits[BOS_ID] = 10.0
    logits[70] = 1.0
    assert greedy_id(logits) == 70
    logits[EOS_ID] = 5.0
    assert greedy_id(logits) == EOS_ID


def test_top_k_one_is_greedy_and_seeds_reproduce():
    logits = torch.randn(260, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    assert all(sample_id(logits, temperature=1.0, top_k=1, generator=g) == greedy_id(logits) for _ in range(20))
    a = [sample_id(logits, temperature=1.0, generator=torch.Generator().manual_seed(5)) for _ in range(3)]
    b = [sample_id(logits, temperature=1.0, generator=torch.Generator().manual_seed(5)) for _ in range(3)]
    assert a == b


def test_top_p_keeps_only_the_nucleus():
    logits = torch.full((260,), -30.0)
    logits[10], logits[11], logits[12] = 5.0, 4.0, 0.0
    g = torch.Generator().manual_seed(0)
    seen = {sample_id(logits, temperature=1.0, top_p=0.9, generator=g) for _ in range(200)}
    assert seen <= {10, 11} and 10 in seen


def test_sampled_generation_is_reproducible_with_a_seed():
    a = bd.generate("random:tiny", "s", max_new_bytes=30, temperature=1.0, top_p=0.95, seed=3)
    b = bd.generate("random:tiny", "s", max_new_bytes=30, temperature=1.0, top_p=0.95, seed=3)
    assert a.output == b.output and a.stats.seed == 3


@pytest.mark.parametrize("bad", [{"top_k": 0}, {"top_p": 1.5}, {"temperature": -0.1}])
def test_bad_sampling_options(bad):
    with pytest.raises(bd.InvalidOptionsError):
        bd.generate("random:tiny", "x", max_new_bytes=1, **bad)


def _long_greedy_run():
    for seed in range(20):  # the first seeded tiny model whose greedy run is long enough to cut
        g = bd.generate(f"random:tiny:{seed}", "x", max_new_bytes=40)
        if len(g.output) >= 8:
            return f"random:tiny:{seed}", g
    raise AssertionError("no tiny model produced 8 bytes")


def test_stop_sequence_ends_generation_after_it():
    spec, base = _long_greedy_run()
    stop = base.output[3:5]
    g = bd.generate(spec, "x", max_new_bytes=40, stop=[stop])
    assert g.output.endswith(stop) and base.output.startswith(g.output) and g.stats.stop_reason == "stop_sequence"
    assert stop not in g.output[:-1]


def test_eos_ends_generation_and_is_not_output():
    from blt_decode.testing import with_eos_for_byte

    spec, base = _long_greedy_run()
    byte = base.output[4]
    cut = base.output.index(byte)  # EOS replaces the first occurrence of that byte
    model = with_eos_for_byte(bd.load_model(spec), byte)
    g = bd.generate(model, "x", max_new_bytes=40)
    assert g.output == base.output[:cut] and g.stats.stop_reason == "eos"
    assert g.stats.new_tokens == cut + 1  # the bytes and the EOS


def test_a_tiny_temperature_is_near_greedy_not_nan():
    """Scores are shifted to a best of 0 before the division: no inf/inf, whatever the temperature."""
    logits = torch.randn(4, 260, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for temperature in (1e-320, 1e-300, 1e-12):
        probs = bd.decoding.sampling.probabilities(logits, temperature=temperature)
        assert torch.isfinite(probs).all()
        assert torch.equal(probs.argmax(-1), bd.decoding.sampling.greedy(logits)) and torch.allclose(probs.max(-1).values, torch.ones(4, dtype=torch.float64))
    model = bd.random_model("tiny", 1)
    assert bd.generate(model, "ab", max_new_bytes=12, temperature=1e-320, seed=1).output == \
        bd.generate(model, "ab", max_new_bytes=12).output


def test_top_p_ranks_exact_ties_by_id():
    probs = bd.decoding.sampling.probabilities(torch.zeros(260), temperature=1.0, top_p=0.001)
    assert probs.nonzero().flatten().tolist() == [EOS_ID]  # the lowest generable id, as greedy's tie rule
