"""The pieces speculative strategies share: one sampling transform, the accept rule's bookkeeping, and
the draft-length cost model (checked against brute-force enumeration)."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from blt_decode.decoding import sampling
from blt_decode.decoding.speculation import DraftLengthController, expected_bytes_per_round
from blt_decode.model.blt import ParamCounts


@given(seed=st.integers(0, 1000), temperature=st.sampled_from([0.0, 0.3, 1.0, 2.5]),
       top_k=st.one_of(st.none(), st.integers(1, 300)), top_p=st.one_of(st.none(), st.floats(0.05, 1.0)))
def test_probabilities_is_one_transform_for_rows_and_batches(seed, temperature, top_k, top_p):
    logits = torch.randn(5, 260, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3
    batch = sampling.probabilities(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    for row, probs in zip(logits, batch):
        alone = sampling.probabilities(row, temperature=temperature, top_k=top_k, top_p=top_p)
        assert torch.allclose(alone, probs, rtol=0, atol=1e-15)
        assert abs(float(probs.sum()) - 1.0) < 1e-12
        assert float(probs[list(sampling.NEVER_GENERATED)].sum()) == 0.0
        if top_k is not None:  # random logits have no ties: at most top_k ids keep mass
            assert int((probs > 0).sum()) <= top_k
    if temperature == 0:
        assert torch.equal(batch.argmax(-1), sampling.greedy(logits))
        assert torch.equal(batch.max(-1).values, torch.ones(5, dtype=torch.float64))


def test_sample_id_draws_from_probabilities(monkeypatch):
    """AR sampling and speculative sampling filter identically: sample_id draws from probabilities()."""
    logits = torch.randn(260, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    seen = []
    monkeypatch.setattr(sampling, "categorical", lambda probs, generator: seen.append(probs) or 7)
    assert sampling.sample_id(logits, temperature=0.8, top_k=20, top_p=0.9) == 7
    assert torch.equal(seen[0], sampling.probabilities(logits, temperature=0.8, top_k=20, top_p=0.9))


def test_sampling_decisions_draw_once_whatever_the_probability():
    """With a generator, a coin flip or a draw consumes exactly one random number even when the outcome is
    certain: otherwise a ratio of 1.0 vs 1 - 1e-16 (batched vs alone arithmetic) would shift every later
    draw. Without one (greedy), nothing is drawn."""
    one_hot = torch.nn.functional.one_hot(torch.tensor(9), 260).double()
    states = []
    for decide in (lambda g: sampling.bernoulli(1.0, g), lambda g: sampling.bernoulli(1.0 - 1e-16, g),
                   lambda g: sampling.bernoulli(0.0, g), lambda g: sampling.bernoulli(0.5, g)):
        g = torch.Generator().manual_seed(0)
        decide(g)
        states.append(g.get_state())
    assert all(torch.equal(s, states[0]) for s in states)
    g = torch.Generator().manual_seed(0)
    assert sampling.draw(one_hot, g) == 9 and not torch.equal(g.get_state(), torch.Generator().manual_seed(0).get_state())
    assert sampling.bernoulli(1.0, None) and not sampling.bernoulli(0.0, None) and sampling.draw(one_hot, None) == 9


def brute_force_bytes(k: int, fresh: float, stale: float, b: float) -> float:
    """Expected committed bytes per round, by enumerating every boundary pattern and acceptance run."""
    total = 0.0
    for pattern in itertools.product((0, 1), repeat=k):
        p_pattern = 1.0
        for x in pattern:
            p_pattern *= b if x else 1 - b
        run, p_run, crossed = 1.0, 1.0, False  # the exact first byte is always committed
        for x in pattern:
            crossed = crossed or bool(x)
            p_run *= stale if crossed else fresh
            run += p_run
        total += p_pattern * run
    return total


@pytest.mark.parametrize("fresh,stale,b", [(1.0, 0.5, 0.3), (0.9, 0.2, 0.05), (0.99, 0.99, 0.5), (0.7, 0.9, 0.0)])
def test_expected_bytes_per_round_matches_brute_force(fresh, stale, b):
    model = expected_bytes_per_round(8, fresh=fresh, stale=stale, boundary_rate=b)
    for k in range(9):
        assert model[k] == pytest.approx(brute_force_bytes(k, fresh, stale, b), rel=1e-12)


PARAMS = ParamCounts(patcher=400_000, encoder=300_000, global_=3_200_000, decoder=600_000)


def controller(fresh, stale, boundary_rate, **kw):
    c = DraftLengthController(PARAMS, PARAMS.encoder + PARAMS.decoder, **kw)
    c.fresh_accepts, c.fresh_rejects = 1e6 * fresh, 1e6 * (1 - fresh)
    c.stale_accepts, c.stale_rejects = 1e6 * stale, 1e6 * (1 - stale)
    c.patches, c.positions = 1e6 * boundary_rate, 1e6
    return c


def test_choice_follows_acceptance_and_stays_in_range():
    assert controller(1.0, 1.0, 0.3).choose() == 64  # every draft right: draft as far as allowed
    assert controller(1.0, 1.0, 0.3).choose(limit=5) == 5
    assert controller(0.3, 0.05, 0.3).choose() == 1  # almost every draft wrong: the shortest draft
    ks = [controller(1.0, s, 0.25).choose() for s in (0.5, 0.8, 0.9, 0.95, 0.99)]
    assert ks == sorted(ks) and ks[0] < ks[-1]  # better stale drafts, longer drafts
    c = controller(1.0, 0.95, 0.25)
    costs = c.costs_per_byte(64)
    assert c.choose() == min(range(1, 65), key=costs.__getitem__)
    assert controller(1.0, 1.0, 0.3, lo=2, hi=9).choose() == 9 and controller(0.1, 0.1, 0.3, lo=2).choose() == 2


def test_observations_split_fresh_and_stale_bytes():
    c = DraftLengthController(PARAMS, 1)
    c.observe(accepted=5, rejected=True, drafted=8, first_boundary=3, boundaries=2)  # 1,2 fresh; 3,4,5 stale; 6 rejected
    assert (c.fresh_accepts, c.fresh_rejects, c.stale_accepts, c.stale_rejects) == (2, 0, 3, 1)
    c.observe(accepted=1, rejected=True, drafted=4, first_boundary=None, boundaries=0)  # byte 2 rejected, fresh
    assert (c.fresh_accepts, c.fresh_rejects) == (3, 1)
    c.observe(accepted=4, rejected=False, drafted=4, first_boundary=1, boundaries=3)
    assert (c.stale_accepts, c.stale_rejects) == (7, 1)


def test_a_prior_without_weight_is_refused():
    for prior in ((0.9, 0.0), (1.5, 10.0), (0.9, -1.0)):
        with pytest.raises(ValueError, match="fresh_prior must be"):
            DraftLengthController(PARAMS, PARAMS.encoder + PARAMS.decoder, fresh_prior=prior)


def test_a_guess_its_proposal_gives_no_mass_is_a_strategy_error():
    """p/q with q(x) = 0 is not a probability (0/0 is nan, and min(1, nan) would accept): refused."""
    import blt_decode as bd
    from blt_decode.decoding.session import DecodeSession
    from blt_decode.decoding.speculation import verify_draft
    from blt_decode.errors import StrategyError

    model = bd.random_model("tiny", 2, dtype=torch.float64)
    session = DecodeSession(model, 64)
    logits = session.prefill([1, 70, 71])[-1]
    first = int(logits.argmax())
    proposals = torch.zeros(2, model.config.vocab_size, dtype=torch.float64)
    proposals[0, 80] = 1.0  # the first guess (80) was drawn from here; the second (81) has no mass
    with pytest.raises(StrategyError, match="drafted id 81 at draft position 2"):
        verify_draft(session, [first, 80, 81], sampler=sampling.Sampler(temperature=1.0), proposals=proposals,
                     generator=torch.Generator().manual_seed(0))
