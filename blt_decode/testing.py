"""A kit for strategy authors: hypothesis strategies for tiny BLT models and prompts, an assertion that
two decoding strategies produce the same bytes, and one that a strategy decodes the same batched as alone.

    from hypothesis import given
    from blt_decode import testing

    @given(model=testing.tiny_models(), prompt=testing.prompts())
    def test_mine_is_greedy(model, prompt):
        testing.assert_same_output(model, prompt, "autoregressive", ("my-strategy", {"k": 4}))

    @given(model=testing.tiny_models(), prompts=st.lists(testing.prompts(), min_size=1, max_size=6))
    def test_mine_batches(model, prompts):
        testing.assert_batched_equals_alone(model, [Request(p, strategy="my-strategy") for p in prompts])

Models are float64 so that exact-equivalence claims are tested without floating-point near-ties.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import attrs
import torch
from hypothesis import strategies as st

from blt_decode.api import Generation, generate, generate_many, random_model
from blt_decode.decoding.session import DecodeSession
from blt_decode.decoding.stats import StatsRecorder
from blt_decode.engine.core import Engine
from blt_decode.engine.request import Request
from blt_decode.execution.runner import CallResult, EagerRunner
from blt_decode.model.blt import BLTModel
from blt_decode.model.config import BLTConfig, TransformerConfig
from blt_decode.model.tokenizer import EOS_ID, OFFSET

StrategySpec = str | tuple[str, dict[str, Any]]


@st.composite
def stack_configs(draw: st.DrawFn, *, dims: Sequence[int] = (8, 16, 24, 32), layers: Sequence[int] = (1, 2),
                  windows: bool = True) -> TransformerConfig:
    """A hypothesis strategy of small transformer stacks: widths ``dims``, depths ``layers``, head
    layouts that divide the width (grouped-query attention included), optional sliding windows."""
    dim = draw(st.sampled_from(dims))
    heads = draw(st.sampled_from([h for h in (1, 2, 4) if dim % h == 0 and (dim // h) % 2 == 0]))
    kv_heads = draw(st.sampled_from([k for k in (None, 1, heads) if k is None or heads % k == 0]))
    window = draw(st.one_of(st.none(), st.integers(2, 12))) if windows else None
    return TransformerConfig(
        dim=dim, n_layers=draw(st.sampled_from(layers)), n_heads=heads, n_kv_heads=kv_heads,
        ffn_dim=draw(st.sampled_from((16, 32, 48))), sliding_window=window,
        rope_theta=draw(st.sampled_from((10000.0, 500000.0))),
    )


@st.composite
def tiny_configs(draw: st.DrawFn, *, patching: tuple[str, ...] = ("entropy", "static")) -> BLTConfig:
    """Random tiny BLT configurations: widths, layers, heads, windows, hash sizes, cross-attention slots,
    entropy or static patching, with or without a maximum patch length."""
    local_dim = draw(st.sampled_from((8, 16, 32)))
    encoder = draw(stack_configs(dims=(local_dim,), layers=(0, 1)))
    decoder = draw(stack_configs(dims=(local_dim,), layers=(1, 2)))
    global_ = draw(stack_configs(dims=(16, 32, 48), layers=(1, 2), windows=False))
    mode = draw(st.sampled_from(patching))
    max_len = draw(st.one_of(st.none(), st.integers(1, 6))) if mode == "entropy" else draw(st.integers(1, 6))
    cross_heads = draw(st.sampled_from([h for h in (1, 2) if local_dim % h == 0]))
    return BLTConfig(
        encoder=encoder, global_=global_, decoder=decoder,
        entropy_model=draw(stack_configs(dims=(8, 16), layers=(1,))) if mode == "entropy" else None,
        cross_attn_k=draw(st.integers(1, 3)), cross_attn_nheads=cross_heads,
        cross_attn_all_layers_decoder=draw(st.booleans()),
        encoder_hash_byte_group_size=draw(st.lists(st.integers(1, 6), max_size=3, unique=True).map(tuple)),
        encoder_hash_byte_group_vocab=draw(st.sampled_from((7, 31, 97))),
        encoder_hash_byte_group_nb_functions=draw(st.integers(0, 2)),
        patching_mode=mode, max_patch_length=max_len, max_seqlen=512,
    )


@st.composite
def tiny_models(draw: st.DrawFn, *, dtype: torch.dtype = torch.float64, patching: tuple[str, ...] = ("entropy", "static"),
                eos: bool = True) -> BLTModel:
    """Seeded random tiny models. Entropy thresholds are calibrated to a drawn mean patch length
    (1.5-8 bytes); with ``eos``, some models emit EOS wherever greedy would pick a drawn byte."""
    config = draw(tiny_configs(patching=patching))
    seed = draw(st.integers(0, 2**16))
    mean_patch = draw(st.floats(1.5, 8.0))
    model = random_model(config, seed, mean_patch_length=mean_patch, dtype=dtype)
    if eos and draw(st.booleans()):
        model = with_eos_for_byte(model, draw(st.integers(0, 255)))
    return model


def prompts(max_size: int = 24) -> st.SearchStrategy[bytes]:
    """Prompts as bytes, the empty prompt included; mixes ASCII text and arbitrary bytes."""
    return st.one_of(st.binary(max_size=max_size), st.text(max_size=max_size).map(lambda s: s.encode("utf-8")[:max_size]))


def with_eos_for_byte(model: BLTModel, byte: int) -> BLTModel:
    """A copy of ``model`` whose EOS logit always equals the logit of ``byte``: greedy decoding then
    stops exactly where the original would emit ``byte`` (ties go to the lower id, EOS)."""
    copy = random_model(model.config, 0, mean_patch_length=None, dtype=model.dtype)
    copy.load_state_dict(model.state_dict())
    with torch.no_grad():
        copy.local_decoder.output.weight[EOS_ID] = copy.local_decoder.output.weight[byte + OFFSET]
    return copy


def _spec(spec: StrategySpec) -> tuple[str, dict[str, Any]]:
    return (spec, {}) if isinstance(spec, str) else spec


def assert_same_output(model: BLTModel, prompt: bytes | str, a: StrategySpec, b: StrategySpec, **generate_kwargs: Any
                       ) -> tuple[Generation, Generation]:
    """Generate with strategies ``a`` and ``b`` (a name, or (name, options)) on the same model and
    prompt, and fail with the first differing position if their bytes differ. Returns both generations."""
    (name_a, opts_a), (name_b, opts_b) = _spec(a), _spec(b)
    ga = generate(model, prompt, strategy=name_a, **generate_kwargs, **opts_a)
    gb = generate(model, prompt, strategy=name_b, **generate_kwargs, **opts_b)
    if ga.output != gb.output:
        i = next((j for j, (x, y) in enumerate(zip(ga.output, gb.output)) if x != y), min(len(ga.output), len(gb.output)))
        raise AssertionError(
            f"{name_a} {opts_a} and {name_b} {opts_b} differ at output byte {i}: "
            f"{ga.output[i:i + 1]!r} vs {gb.output[i:i + 1]!r} (common prefix {ga.output[max(0, i - 16):i]!r}; "
            f"lengths {len(ga.output)} vs {len(gb.output)}; stop reasons {ga.stats.stop_reason} vs {gb.stats.stop_reason})"
        )
    return ga, gb


#: what "the same as decoding it alone" compares, besides the output bytes
_SAME_STATS = ("passes", "new_tokens", "patches", "stop_reason", "seed", *StatsRecorder().strategy_counters())


def assert_batched_equals_alone(model: BLTModel, requests: Sequence[Request], *, batch_size: int = 4,
                                backend: str = "eager", join_after: int = 2) -> list[Generation]:
    """Decode ``requests`` together with the batched :class:`~blt_decode.engine.core.Engine` and each alone with
    :func:`~blt_decode.api.generate`, and fail, naming the request and the first differing byte or
    statistic, unless every request gets the same bytes and the same per-request statistics (forward
    passes per module, drafts, verifications, blocks, stop reason).

    Half of the requests are submitted first; the rest join after ``join_after`` engine steps, while the
    first ones are mid-generation. With more requests than ``batch_size``, later ones also wait for a
    slot and take the slot of a finished one. Requests without a seed get seed = their index, so that
    sampling strategies are compared on equal terms. Returns the batched generations."""
    requests = [r if r.seed is not None else attrs.evolve(r, seed=i) for i, r in enumerate(requests)]
    engine = Engine(model, backend=backend, max_batch=batch_size)
    first = (len(requests) + 1) // 2
    streams = [engine.submit_request(r) for r in requests[:first]]
    for _ in range(join_after):
        if not engine.idle:
            engine.step()
    streams += [engine.submit_request(r) for r in requests[first:]]
    engine.run_until_idle()
    batched = [s.result() for s in streams]
    for i, (r, g) in enumerate(zip(requests, batched)):
        alone = generate(model, r.prompt, strategy=r.strategy, backend=backend, max_new_bytes=r.max_new_bytes,
                         stop=r.stop, seed=r.seed, **dict(r.options))
        where = f"request {i} ({r.strategy} {dict(r.options)}, prompt {r.prompt!r})"
        if g.output != alone.output:
            j = next((k for k, (x, y) in enumerate(zip(g.output, alone.output)) if x != y), min(len(g.output), len(alone.output)))
            raise AssertionError(f"{where}: batched output differs from decoding it alone at byte {j}: "
                                 f"{g.output[j:j + 8]!r} vs {alone.output[j:j + 8]!r} (lengths {len(g.output)} vs {len(alone.output)})")
        for name in _SAME_STATS:
            a, b = getattr(g.stats, name), getattr(alone.stats, name)
            if a != b:
                raise AssertionError(f"{where}: batched {name} = {a!r}, alone {name} = {b!r}")
    return batched


def tie_flips(reference: tuple[BLTModel, str], candidate: tuple[BLTModel, str], prompts: Sequence[bytes | str],
              settings: Sequence[StrategySpec], *, max_new_bytes: int = 64, batch_size: int = 4) -> tuple[int, int, list[str]]:
    """How often ``candidate`` (a model and a backend: another device, dtype or backend) picks other bytes
    than ``reference`` at near-ties: every prompt under every (strategy, options) setting, decoded by the
    reference alone and by the candidate alone and batched. Returns (generations that differ, generations,
    where they differ); a generation that agrees must have made the same forward passes (asserted)."""
    (ref_model, ref_backend), (model, backend) = reference, candidate
    differ, total, where = 0, 0, []
    for setting in settings:
        strategy, options = _spec(setting)
        ref = [generate(ref_model, p, strategy=strategy, backend=ref_backend, max_new_bytes=max_new_bytes, **options)
               for p in prompts]
        alone = [generate(model, p, strategy=strategy, backend=backend, max_new_bytes=max_new_bytes, **options)
                 for p in prompts]
        batched = generate_many(model, list(prompts), strategy=strategy, backend=backend, batch_size=batch_size,
                                max_new_bytes=max_new_bytes, **options)
        for r, a, b, p in zip(ref, alone, batched, prompts):
            for mode, g in (("alone", a), ("batched", b)):
                total += 1
                if g.output != r.output:
                    differ += 1
                    where.append(f"{strategy} {options} {mode} on {p[:20]!r}")
                else:
                    assert g.stats.passes == r.stats.passes, (strategy, options, mode)
    return differ, total, where


def config_summary(model: BLTModel) -> str:
    """A one-line description of a model's config, for failure messages."""
    return repr(attrs.asdict(model.config))


def wrong_logits(model: BLTModel, ids: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Logits shaped like ``like`` whose every row points at a byte that the exact model does *not*
    choose greedily after ``ids`` (1-D, BOS first; computed with the uncached reference forward). Test
    doubles use it to build drafters that are always wrong."""
    from blt_decode.decoding.sampling import greedy_id

    exact = greedy_id(model(ids[None])[0, -1])
    wrong = OFFSET + (exact - OFFSET + 1) % 256 if exact >= OFFSET else OFFSET
    forced = torch.full_like(like, -1e9)
    forced[..., wrong] = 0.0
    return forced


def wrong_drafts(session: DecodeSession, call: Any, logits: torch.Tensor) -> torch.Tensor:
    """A :data:`Rewrite` for :class:`RewritingBackend`: every drafted position points at a byte the exact
    model does not choose (:func:`wrong_logits`), so every verification rejects the whole draft."""
    if call.kind != "draft":
        return logits
    drafted = session.ids[: session.length + session.draft_length + len(call.ids)]
    return wrong_logits(session.model, drafted, logits)


@contextlib.contextmanager
def _registered(hook: str, obj: Any) -> Iterator[str]:
    from blt_decode import hookimpl
    from blt_decode.plugins import registry as plugins
    plugin = type(f"_Testing_{hook}", (), {hook: hookimpl(lambda self, register: register(obj))})()
    manager = plugins.get_plugin_manager()
    manager.register(plugin, name=f"testing-{obj.name}")
    plugins.refresh()
    try:
        yield obj.name
    finally:  # the other plugins stay registered: these blocks nest
        manager.unregister(plugin)
        plugins.refresh()


def registered_strategy(strategy: Any) -> contextlib.AbstractContextManager[str]:
    """Register ``strategy`` (an object, as a plugin's ``register_strategies`` would) for the duration of
    the block, without packaging it; yields its name. The registry checks it as it checks any plugin's."""
    return _registered("register_strategies", strategy)


def registered_backend(backend: Any) -> contextlib.AbstractContextManager[str]:
    """Register ``backend`` (e.g. a :class:`RewritingBackend`) for the duration of the block; yields its name."""
    return _registered("register_backends", backend)


#: ``rewrite(session, call, logits) -> logits``: the session as it was before the call
Rewrite = Callable[[DecodeSession, Any, torch.Tensor], torch.Tensor]


class RewritingBackend:
    """A test double: the eager backend, with the logits of every call that succeeds passed through
    ``rewrite(session, call, logits)`` (``call.kind`` is "append", "draft" or "denoise"; the session is as
    it was before the call). A drafter that is always wrong (with :func:`wrong_logits`) shows that a
    strategy's exactness does not rest on its drafts; logits restricted to a few ids make a sampler's
    every branch enumerable. Lone sessions and the engine both run through it."""

    def __init__(self, name: str, description: str, rewrite: Rewrite):
        self.name, self.description, self.rewrite = name, description, rewrite

    def runner(self, model: BLTModel) -> EagerRunner:
        return _RewritingRunner(model, self.rewrite)


class _RewritingRunner(EagerRunner):
    """The eager runner, its successful calls' logits passed through ``rewrite`` (:class:`RewritingBackend`)."""

    def __init__(self, model: BLTModel, rewrite: Rewrite):
        super().__init__(model)
        self.rewrite = rewrite

    def run(self, state: Any, items: Any, tally: Any = None) -> list[CallResult]:
        results = super().run(state, items, tally)
        return [attrs.evolve(r, output=self.rewrite(session, call, r.output)) if isinstance(r.output, torch.Tensor)
                else r for (session, call), r in zip(items, results)]


# -- exact output distributions and goodness of fit -------------------------------------------------
#: an output of a sampled generation: (bytes, True if it ended with EOS)
Outcome = tuple[bytes, bool]


class _Abandon(Exception):
    """Every continuation of a replayed branch was pruned."""


def output_distribution(model: BLTModel, prompt: bytes | str, strategy: str, max_new_bytes: int, *,
                        backend: str = "eager", prune: float = 1e-12, **options: Any) -> tuple[dict[Outcome, float], float]:
    """The exact distribution of a sampling strategy's output, by enumerating every branch of its random
    draws: ``blt_decode.decoding.sampling.categorical`` and ``blt_decode.decoding.sampling.bernoulli`` (the only two
    places randomness enters) are replaced by an oracle that replays a script of choices, and a
    depth-first search re-runs the generation once per leaf of the decision tree. The probability of an
    output is the sum over the leaves that produce it of the product of the chosen branches'
    probabilities, so this is the distribution the *implementation* samples from, computed in closed form.

    Branches whose path probability falls below ``prune`` are not explored; returns (distribution,
    total pruned probability), so that comparisons can allow for the pruned mass. Keep supports small
    (``top_k``, or a backend that restricts the logits): the number of leaves grows with support^draws."""
    from blt_decode.decoding import sampling
    dist: dict[Outcome, float] = {}
    pruned = 0.0
    stack: list[tuple[int, ...]] = [()]
    saved = sampling.categorical, sampling.bernoulli
    while stack:
        script = stack.pop()
        path: list[int] = []
        weight = [1.0]

        def choose(branches: list[tuple[Any, float]]) -> Any:
            nonlocal pruned
            depth = len(path)
            if depth < len(script):
                value, p = branches[script[depth]]
            else:  # a new node: explore the first branch now, the others later
                kept = [i for i, (_, p) in enumerate(branches) if weight[0] * p >= prune]
                pruned += weight[0] * sum(p for i, (_, p) in enumerate(branches) if i not in kept)
                if not kept:
                    raise _Abandon
                stack.extend(tuple(path) + (i,) for i in kept[1:])
                value, p = branches[kept[0]]
                path.append(kept[0])
                weight[0] *= p
                return value
            path.append(script[depth])
            weight[0] *= p
            return value

        def categorical(probs: torch.Tensor, generator: Any = None) -> int:
            values = probs.detach().to(torch.float64).cpu()
            ids = torch.nonzero(values > 0).flatten().tolist()
            ids.sort(key=lambda i: -float(values[i]))
            return choose([(i, float(values[i])) for i in ids])

        def bernoulli(prob: float, generator: Any = None) -> bool:
            if prob >= 1.0:
                return True
            if prob <= 0.0:
                return False
            return choose([(True, prob), (False, 1.0 - prob)])

        sampling.categorical, sampling.bernoulli = categorical, bernoulli
        try:
            g = generate(model, prompt, strategy=strategy, backend=backend, max_new_bytes=max_new_bytes, seed=0, **options)
        except _Abandon:
            continue
        finally:
            sampling.categorical, sampling.bernoulli = saved
        key = (g.output, g.stats.stop_reason == "eos")
        dist[key] = dist.get(key, 0.0) + weight[0]
    return dist, pruned


@torch.no_grad()
def ar_output_distribution(model: BLTModel, prompt: bytes | str, max_new_bytes: int, *, temperature: float,
                           top_k: int | None = None, top_p: float | None = None, logits_transform: Any = None,
                           prune: float = 0.0) -> dict[Outcome, float]:
    """The exact distribution of autoregressive sampling's output, from the model's uncached reference
    forward (one batched forward per output length): P(y) = prod_i p(y_i | prompt, y_<i), with ``p``
    from :func:`blt_decode.decoding.sampling.probabilities`, stopping at EOS or ``max_new_bytes``.
    ``logits_transform`` is applied to the logits first (to mirror a test backend that restricts them);
    prefixes below ``prune`` are dropped."""
    from blt_decode.decoding.sampling import probabilities
    from blt_decode.model import tokenizer

    base = tokenizer.encode(tokenizer.to_bytes(prompt))
    frontier: list[tuple[list[int], float]] = [([], 1.0)]
    dist: dict[Outcome, float] = {}
    for _ in range(max_new_bytes):
        if not frontier:
            break
        ids = torch.tensor([base + out for out, _ in frontier], device=model.device)
        logits = model(ids)[:, -1]
        if logits_transform is not None:
            logits = logits_transform(logits)
        probs = probabilities(logits, temperature=temperature, top_k=top_k, top_p=top_p).cpu()
        nxt = []
        for (out, p), row in zip(frontier, probs):
            for i in torch.nonzero(row > 0).flatten().tolist():
                q = p * float(row[i])
                if q < prune:
                    continue
                if i == EOS_ID:
                    key = (tokenizer.decode(out), True)
                    dist[key] = dist.get(key, 0.0) + q
                else:
                    nxt.append((out + [i], q))
        frontier = nxt
    for out, p in frontier:
        key = (tokenizer.decode(out), False)
        dist[key] = dist.get(key, 0.0) + p
    return dist


def max_difference(a: dict[Any, float], b: dict[Any, float]) -> float:
    """The largest absolute difference between two distributions over the union of their keys."""
    return max((abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in set(a) | set(b)), default=0.0)


def chi2_sf(statistic: float, dof: int) -> float:
    """P(X >= statistic) for X ~ chi-square with ``dof`` degrees of freedom (the regularized upper
    incomplete gamma function Q(dof/2, statistic/2); series / continued fraction, as in Numerical Recipes)."""
    import math

    a, x = dof / 2.0, statistic / 2.0
    if x <= 0:
        return 1.0
    lead = math.exp(-x + a * math.log(x) - math.lgamma(a))
    if x < a + 1.0:  # series for P, then Q = 1 - P
        term = total = 1.0 / a
        n = a
        for _ in range(10_000):
            n += 1.0
            term *= x / n
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return max(0.0, 1.0 - total * lead)
    tiny = 1e-300  # Lentz's continued fraction for Q
    b = x + 1.0 - a
    c, d = 1.0 / tiny, 1.0 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return min(1.0, lead * h)


def g_test(observed: dict[Any, int], expected: dict[Any, float], *, min_expected: float = 5.0) -> tuple[float, int, float]:
    """G-test of goodness of fit of ``observed`` counts to the distribution ``expected``: categories
    whose expected count is below ``min_expected`` are pooled into one (together with observed
    categories the distribution does not list). Returns (G, degrees of freedom, p-value)."""
    import math

    n = sum(observed.values())
    big = {k for k, p in expected.items() if p * n >= min_expected}
    cells = [(observed.get(k, 0), expected[k] * n) for k in big]
    rest_expected = n - sum(e for _, e in cells)
    rest_observed = n - sum(o for o, _ in cells)
    if rest_expected >= min_expected or rest_observed:
        cells.append((rest_observed, max(rest_expected, 1e-300)))
    g = 2.0 * sum(o * math.log(o / e) for o, e in cells if o > 0)
    dof = max(len(cells) - 1, 1)
    return g, dof, chi2_sf(g, dof)
