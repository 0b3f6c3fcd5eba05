"""Verifying a draft, shared by the exact speculative strategies (BLT-S, BLT-DV): the accept rule
(:func:`verify_draft`, speculative sampling, of which greedy verification is the one-hot case) and the
adaptive draft length (:class:`DraftLengthController`, minimising Eq. 8 traffic per committed byte).
docs/blt-s.md states the rule, why it is exact, and derives the cost model.
"""

from __future__ import annotations

from typing import Sequence

import attrs
import torch

from blt_decode.decoding import sampling
from blt_decode.decoding.sampling import Sampler
from blt_decode.decoding.session import DecodeSession
from blt_decode.errors import StrategyError
from blt_decode.model.blt import ParamCounts
from blt_decode.trace import Verified

GREEDY = Sampler()


@attrs.frozen
class Verification:
    """What one verification pass decided."""

    #: length of the kept prefix of the draft, the exact first id included (1..len(draft))
    accepted: int
    #: distribution of the next byte: norm(max(0, p - q)) after a rejection, p after a fully kept draft
    following: torch.Tensor
    #: index (into the draft) of the first drafted id that starts a new patch, None if none does; from
    #: there on a BLT-S draft read a stale latent
    first_boundary: int | None
    #: patch starts the verification pass placed after the draft's first id (the drafted positions and
    #: the position after the draft, whose start the last entropy decides), rejected ones included: any
    #: of them made the pass run the global model
    boundaries: int


def verify_draft(session: DecodeSession, draft: Sequence[int], *, sampler: Sampler = GREEDY,
                 proposals: torch.Tensor | None = None, generator: torch.Generator | None = None,
                 k: int | None = None) -> Verification:
    """One verification pass over ``draft`` placed after the committed sequence; its first id is exact
    (drawn from the exact distribution, or the previous round's replacement), the others are guesses.

    ``proposals`` [len(draft) - 1, vocab] holds the distribution each guess was drawn from (row j for
    ``draft[j + 1]``, which must give it positive probability); None means a deterministic drafter (a
    point mass at each drafted id, as greedy drafting is). ``sampler`` turns the verified logits into
    the target distribution ``p``. Keeps the prefix the speculative-sampling rule accepts, rolls every
    cache back to it, counts drafted/accepted bytes, and emits a :class:`~blt_decode.trace.Verified`
    event (``k``: the draft length the round chose, default ``len(draft) - 1``). For greedy the
    following distribution is one-hot at the corrected or free byte."""
    start, guesses = session.length, len(draft) - 1
    verified = session.verify(draft)
    boundaries = [s - start for s in session.starts if start < s <= start + guesses + 1]
    target = sampler.probabilities(verified)  # target[j]: exact distribution of the byte after draft[j]
    ids = torch.as_tensor(list(draft[1:]), dtype=torch.long, device=target.device)
    rows = torch.arange(guesses, device=target.device)
    p_at = target[rows, ids]
    q_at = torch.ones_like(p_at) if proposals is None else proposals[rows, ids].to(p_at.dtype)
    if proposals is not None and bool((q_at <= 0).any()):  # p/q would be 0/0 or x/0: no rule applies
        j = int((q_at <= 0).nonzero()[0])
        who = f"strategy {session.strategy_name!r}" if session.strategy_name else "the caller"
        raise StrategyError(f"{who} drafted id {int(ids[j])} at draft position {j + 1}, which its own proposal "
                            "distribution gives probability 0; a guess must be drawn from its proposal row")
    accepted = 1
    for ratio in (p_at / q_at).tolist():
        if not sampling.bernoulli(min(1.0, ratio), generator):
            break
        accepted += 1
    if accepted < len(draft):
        j = accepted - 1
        q = proposals[j].to(target.dtype) if proposals is not None else \
            torch.nn.functional.one_hot(ids[j], target.shape[-1]).to(target.dtype)
        residual = (target[j] - q).clamp_min(0.0)
        total = float(residual.sum())
        # total == 0 only when p <= q everywhere, i.e. p == q up to rounding: then a rejection had
        # probability ~0 and p itself is the right distribution
        following = residual / total if total > 0.0 else target[j]
        session.truncate(start + accepted)
    else:
        following = target[-1]
    session.stats.add(drafted_bytes=guesses, accepted_bytes=accepted - 1)
    session.emit(Verified(start, tuple(int(i) for i in draft), accepted, guesses if k is None else k))
    first_boundary = min(boundaries) if boundaries and min(boundaries) <= guesses else None
    return Verification(accepted, following, first_boundary, len(boundaries))


def expected_bytes_per_round(k: int, *, fresh: float, stale: float, boundary_rate: float) -> list[float]:
    """Expected committed bytes per round for every draft length 0..``k``: the exact first byte plus the
    expected accepted run, when drafted byte i is accepted with probability ``fresh`` if no patch starts
    among drafted bytes 1..i, else ``stale``, and each drafted byte starts a patch with probability
    ``boundary_rate`` independently; acceptance stops at the first rejection.

    P(bytes 1..i all accepted) = (c·f)^i + sum over the first boundary m <= i of (c·f)^(m-1)·b·s^(i-m+1)
    with c = 1 - b, computed by the recurrence S_i = s·S_(i-1) + (c·f)^(i-1)·b·s."""
    f, s, b = fresh, stale, boundary_rate
    cf, run, tail, total = (1.0 - b) * f, 1.0, 0.0, 1.0
    out = [1.0]
    for _ in range(k):
        tail = s * tail + run * b * s  # first boundary at or before i, all accepted
        run *= cf  # no boundary up to i, all accepted
        total += run + tail
        out.append(total)
    return out


def _check_prior(name: str, prior: tuple[float, float]) -> None:
    mean, weight = prior
    if not (0.0 <= mean <= 1.0 and weight > 0.0):
        raise ValueError(f"{name} must be (mean in 0..1, pseudo-count weight > 0), got {prior!r}")


@attrs.define
class DraftLengthController:
    """Chooses each round's draft length ``k`` (drafted bytes past the exact first byte) so that the
    expected weight traffic per committed byte (Eq. 8 plus the entropy model) is minimal:

        cost(k)  = P_draft·(1 + ρ·(k - 1))              draft passes (BLT-S: ρ = 1, one pass per byte)
                 + P_patcher + P_enc + P_dec             the verification pass ...
                 + P_glob·(1 - (1 - b)^(k + 1))          ... and its global pass, if a patch closes
        bytes(k) = expected_bytes_per_round(k)           (exact first byte + expected accepted run)
        k*       = argmin over lo..hi of cost(k) / bytes(k)

    Acceptance is tracked separately for drafted bytes *before* the draft's first patch boundary
    (``fresh``: a BLT-S draft there reads the right latent, so it is accepted unless numerics differ)
    and from it on (``stale``), each as the mean of a Beta posterior: prior pseudo-counts plus the
    accepted bytes and rejections seen so far in this generation (a rejection ends a round and the bytes
    after it are never examined, so accepted/drafted would underestimate acceptance). ``b`` is the rate
    of patch starts per verified position over a short memory (``boundary_decay`` per byte: patches come in
    bursts, and the estimate should follow them), with a little of the prompt's rate kept as a floor. It
    is measured on the verified positions, rejected drafts included: a patch that a wrong draft closes
    costs a global pass all the same.
    ``ρ`` is the draft passes per extra drafted byte (1 for BLT-S, 0 for one-pass diffusion, estimated
    for multi-pass diffusion). The cost also counts the entropy model's weights (read once per
    verification pass): Eq. 8 leaves them out, and without them the cost is flat in ``k`` wherever
    patches are rare. docs/blt-s.md derives the model and states its assumptions."""

    params: ParamCounts
    #: weights read by one draft pass (BLT-S: encoder + decoder; BLT-DV: decoder)
    draft_pass_params: int
    lo: int = 1
    hi: int = 64
    #: draft passes per extra drafted byte; None = estimate it from the rounds (multi-pass diffusion)
    passes_per_byte: float | None = 1.0
    #: Beta prior of each acceptance as (mean, pseudo-count weight). The stale prior is optimistic on
    #: purpose: a wrong guess is corrected by the first rejections, while a pessimistic one keeps drafts
    #: short, so stale bytes are rarely seen and the guess is never corrected. Its weight (10 bytes) keeps
    #: a run of accepted bytes from pushing the estimate to ~1 and k to the cap, where one rejection
    #: wastes dozens of drafted bytes (docs/blt-s.md: how it was chosen)
    fresh_prior: tuple[float, float] = attrs.field(default=(0.999, 10.0), validator=lambda i, a, v: _check_prior(a.name, v))
    stale_prior: tuple[float, float] = attrs.field(default=(0.97, 10.0), validator=lambda i, a, v: _check_prior(a.name, v))
    #: per-position discount of the boundary-rate counts (memory of about 20 positions)
    boundary_decay: float = 0.95
    #: accepted bytes and rejections seen, before and after the draft's first boundary
    fresh_accepts: float = 0.0
    fresh_rejects: float = 0.0
    stale_accepts: float = 0.0
    stale_rejects: float = 0.0
    #: discounted patch starts and positions seen by verification passes
    patches: float = 0.0
    positions: float = 0.0
    #: the prompt's boundary rate (set by :meth:`start`), weighted as ``prior_bytes`` undiscounted bytes
    prompt_boundary_rate: float = 0.25
    prior_bytes: float = 2.0
    extra_passes: float = 0.5
    extra_bytes: float = 1.0

    @staticmethod
    def _rate(accepts: float, rejects: float, prior: tuple[float, float]) -> float:
        mean, weight = prior
        return (accepts + mean * weight) / (accepts + rejects + weight)

    @property
    def fresh_acceptance(self) -> float:
        return self._rate(self.fresh_accepts, self.fresh_rejects, self.fresh_prior)

    @property
    def stale_acceptance(self) -> float:
        return self._rate(self.stale_accepts, self.stale_rejects, self.stale_prior)

    @property
    def boundary_rate(self) -> float:
        rate = (self.patches + self.prompt_boundary_rate * self.prior_bytes) / (self.positions + self.prior_bytes)
        return min(max(rate, 1e-4), 1.0)

    @property
    def draft_passes_per_byte(self) -> float:
        if self.passes_per_byte is not None:
            return self.passes_per_byte
        return self.extra_passes / self.extra_bytes

    def costs_per_byte(self, hi: int) -> list[float]:
        """Expected parameters read (Eq. 8 plus the entropy model) per committed byte, for draft lengths
        0..``hi`` (index = k)."""
        p, b, rho = self.params, self.boundary_rate, self.draft_passes_per_byte
        per_round = expected_bytes_per_round(hi, fresh=self.fresh_acceptance, stale=self.stale_acceptance,
                                             boundary_rate=b)
        out = []
        for k, expected in enumerate(per_round):
            drafting = self.draft_pass_params * (1.0 + rho * (k - 1)) if k else 0.0
            verifying = p.patcher + p.encoder + p.decoder + p.global_ * (1.0 - (1.0 - b) ** (k + 1))
            out.append((drafting + verifying) / expected)
        return out

    def choose(self, limit: int | None = None) -> int:
        """The best draft length in ``lo..min(hi, limit)`` (a ``limit`` below ``lo`` is returned as is)."""
        hi = self.hi if limit is None else min(self.hi, limit)
        if hi <= self.lo:
            return hi
        costs = self.costs_per_byte(hi)
        return min(range(self.lo, hi + 1), key=costs.__getitem__)

    def start(self, *, patches: int, length: int) -> None:
        """Seed the boundary rate with the prompt's: ``patches`` closed over ``length`` committed ids."""
        if length > 1:
            self.prompt_boundary_rate = min(max(patches / length, 1e-3), 1.0)

    def observe(self, *, accepted: int, rejected: bool, drafted: int, first_boundary: int | None, boundaries: int,
                draft_passes: int | None = None) -> None:
        """Record one round: ``accepted`` of the ``drafted`` bytes kept, ``rejected`` if the one after them
        was rejected (False when the whole draft was kept), ``first_boundary`` and ``boundaries`` as in
        :class:`Verification`, and for multi-pass diffusion the ``draft_passes`` spent."""
        m = first_boundary if first_boundary is not None else drafted + 1
        self.fresh_accepts += min(accepted, m - 1)
        self.fresh_rejects += 1 if rejected and accepted + 1 < m else 0
        self.stale_accepts += max(accepted - (m - 1), 0)
        self.stale_rejects += 1 if rejected and accepted + 1 >= m else 0
        keep = self.boundary_decay ** (drafted + 1)
        self.patches = keep * self.patches + boundaries
        self.positions = keep * self.positions + drafted + 1
        if draft_passes is not None and drafted > 1:
            self.extra_passes += max(draft_passes - 1, 0)
            self.extra_bytes += drafted - 1
