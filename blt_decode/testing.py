"""A kit for strategy authors: hypothesis strategies for tiny BLT models and prompts, and an assertion
that two decoding strategies produce the same bytes.

    from hypothesis import given
    from blt_decode import testing

    @given(model=testing.tiny_models(), prompt=testing.prompts())
    def test_mine_is_greedy(model, prompt):
        testing.assert_same_output(model, prompt, "autoregressive", ("my-strategy", {"k": 4}))

Models are float64 so that exact-equivalence claims are tested without floating-point near-ties.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import attrs
import torch
from hypothesis import strategies as st

from blt_decode.api import Generation, generate, random_model
from blt_decode.config import BLTConfig, TransformerConfig
from blt_decode.model import BLTModel
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
