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
from typing import Any, Iterator, Sequence

import attrs
import torch
from hypothesis import strategies as st

from blt_decode.api import Generation, generate, random_model
from blt_decode.config import BLTConfig, TransformerConfig
from blt_decode.model import BLTModel
from blt_decode.request import Request
from blt_decode.tokenizer import EOS_ID, OFFSET

StrategySpec = str | tuple[str, dict[str, Any]]


@st.composite
def stack_configs(draw: st.DrawFn, *, dims=(8, 16, 24, 32), layers=(1, 2), windows=True) -> TransformerConfig:
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
_SAME_STATS = ("passes", "new_tokens", "patches", "stop_reason", "seed", "drafted_bytes", "accepted_bytes",
               "verify_passes", "blocks", "denoise_passes")


def assert_batched_equals_alone(model: BLTModel, requests: Sequence[Request], *, batch_size: int = 4,
                                backend: str = "eager", join_after: int = 2) -> list[Generation]:
    """Decode ``requests`` together with the batched :class:`~blt_decode.engine.Engine` and each alone with
    :func:`~blt_decode.api.generate`, and fail, naming the request and the first differing byte or
    statistic, unless every request gets the same bytes and the same per-request statistics (forward
    passes per module, drafts, verifications, blocks, stop reason).

    Half of the requests are submitted first; the rest join after ``join_after`` engine steps, while the
    first ones are mid-generation. With more requests than ``batch_size``, later ones also wait for a
    slot and take the slot of a finished one. Requests without a seed get seed = their index, so that
    sampling strategies are compared on equal terms. Returns the batched generations."""
    from blt_decode.engine import Engine

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


def config_summary(model: BLTModel) -> str:
    """A one-line description of a model's config, for failure messages."""
    return repr(attrs.asdict(model.config))


def wrong_logits(model: BLTModel, ids: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Logits shaped like ``like`` whose every row points at a byte that the exact model does *not*
    choose greedily after ``ids`` (1-D, BOS first; computed with the uncached reference forward). Test
    doubles use it to build drafters that are always wrong."""
    from blt_decode.sampling import greedy_id

    exact = greedy_id(model(ids[None])[0, -1])
    wrong = OFFSET + (exact - OFFSET + 1) % 256 if exact >= OFFSET else OFFSET
    forced = torch.full_like(like, -1e9)
    forced[..., wrong] = 0.0
    return forced


@contextlib.contextmanager
def registered_backend(backend: Any) -> Iterator[str]:
    """Register ``backend`` (e.g. a test double) for the duration of the block; yields its name."""
    from blt_decode import hookimpl, plugins

    class _Plugin:
        @hookimpl
        def register_backends(self, register):
            register(backend)

    plugins.reset()
    plugins.get_plugin_manager().register(_Plugin(), name=f"testing-{backend.name}")
    try:
        yield backend.name
    finally:
        plugins.reset()
