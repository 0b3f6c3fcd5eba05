"""The real cross-check: tiny random ``BltForCausalLM`` models built by transformers from a config (no
download), saved with ``save_pretrained``, loaded by blt-decode, and compared in float32:

- patch lengths of our patcher = transformers' patcher on the same bytes;
- logits of our full forward = transformers' within 1e-5 (max abs) on random byte strings;
- greedy generation of our cached autoregressive strategy = greedy generation by re-running
  transformers' forward per byte, for 64 bytes;
- HF -> native -> original -> native is bit-identical, our HF export loads strictly in transformers;
- our original-layout loader agrees with the mapping of transformers' conversion script
  (convert_blt_weights_to_hf.py, re-stated here from its rules) on a synthesized original checkpoint.

Sequences stay below 512 bytes except in the "windows" variant, so the tests also hold with transformers
versions before 5.23, which ran every stack with full causal attention (see docs/checkpoints.md).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="the transformers cross-check needs transformers: pip install -e '.[test]'"
)
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import BltConfig as HFConfig  # noqa: E402
from transformers import BltForCausalLM  # noqa: E402

import blt_decode  # noqa: E402
from blt_decode.plugins import registry as plugins  # noqa: E402
from blt_decode.checkpoints import formats
from blt_decode.checkpoints import original  # noqa: E402
from blt_decode.decoding import options
from blt_decode.decoding.protocol import DecodeContext  # noqa: E402
from blt_decode.decoding.sampling import NEVER_GENERATED  # noqa: E402
from blt_decode.decoding.session import open_session  # noqa: E402
from blt_decode.model.blt import BLTModel, PatchLayout  # noqa: E402
from blt_decode.model.patching import patch_lengths  # noqa: E402
from blt_decode.model.tokenizer import PAD_ID  # noqa: E402

TF_VERSION = tuple(int(p) for p in transformers.__version__.split(".")[:2])
#: transformers 5.23 added local_attention_window_len / the patcher's sliding_window
HAS_WINDOWS = TF_VERSION >= (5, 23)
TOL = 1e-5


def _sub(hidden: int, layers: int, heads: int, ffn: int, theta: float | None = None, **kw) -> dict:
    if theta is not None:  # transformers >= 5 reads rope_parameters, 4.x rope_theta
        kw.update(rope_theta=theta, rope_parameters={"rope_type": "default", "rope_theta": theta})
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=ffn,
                max_position_embeddings=2048, **kw)


def hf_theta(sub_config) -> float:
    params = getattr(sub_config, "rope_parameters", None)
    return params["rope_theta"] if params else sub_config.rope_theta


VARIANTS = {
    # k * encoder dim == global dim (no token projection); full causal local models
    "plain": dict(
        local_attention_window_len=None, cross_attn_k=2,
        encoder_hash_byte_group_size=[3, 4, 5], encoder_hash_byte_group_vocab=97, encoder_hash_byte_group_nb_functions=1,
        patcher_config=_sub(32, 2, 2, 96, sliding_window=512),
        encoder_config=_sub(32, 1, 2, 96, hidden_size_global=64, cross_attn_k=2),
        decoder_config=_sub(32, 2, 2, 96, hidden_size_global=64, cross_attn_k=2),
        global_config=_sub(64, 2, 4, 192),
    ),
    # global token projection, GQA in the global model, 2 hash functions, decoder cross-attention in the
    # first layer only, a different rotary base per stack, non-default norm epsilons
    "projection": dict(
        local_attention_window_len=None, cross_attn_k=2,
        encoder_hash_byte_group_size=[3, 4], encoder_hash_byte_group_vocab=53, encoder_hash_byte_group_nb_functions=2,
        patcher_config=_sub(32, 1, 4, 64, theta=999.0, sliding_window=None),
        encoder_config=_sub(32, 2, 2, 80, theta=10000.0, hidden_size_global=48, cross_attn_k=2, rms_norm_eps=1e-6),
        decoder_config=_sub(32, 2, 2, 80, theta=20000.0, hidden_size_global=48, cross_attn_k=2, cross_attn_all_layers=False),
        global_config=_sub(48, 2, 4, 128, num_key_value_heads=2),
    ),
    # local and patcher attention windows shorter than the sequences (transformers >= 5.23)
    "windows": dict(
        local_attention_window_len=8, cross_attn_k=1,
        encoder_hash_byte_group_size=[2, 3], encoder_hash_byte_group_vocab=31, encoder_hash_byte_group_nb_functions=1,
        patcher_config=_sub(32, 2, 2, 96, sliding_window=6),
        encoder_config=_sub(32, 2, 2, 96, hidden_size_global=64, cross_attn_k=1),
        decoder_config=_sub(32, 2, 2, 96, hidden_size_global=64, cross_attn_k=1),
        global_config=_sub(64, 1, 4, 192),
    ),
}


def ids_of(data: bytes) -> torch.Tensor:
    return torch.tensor([[1] + [b + 4 for b in data]])


def random_bytes(n: int, seed: int) -> bytes:
    return bytes(torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist())


CALIBRATION = b"def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n" * 2


def build_hf(variant: str, seed: int = 0, max_patch_length: int | None = None) -> BltForCausalLM:
    """A random BltForCausalLM whose threshold makes patches of about 3 bytes on the calibration text."""
    torch.manual_seed(seed)
    config = HFConfig(vocab_size=260, patching_threshold=0.0, max_patch_length=max_patch_length, **VARIANTS[variant])
    model = BltForCausalLM(config).eval()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        for _, p in model.named_parameters():
            if p.ndim == 1:  # norms away from 1, so that a swapped norm mapping cannot pass
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
        # a random patcher predicts nearly uniform bytes (entropies packed just below log 260); sharper
        # predictions spread the entropies, so that no entropy sits within rounding of the threshold
        model.model.patcher.lm_head.weight.mul_(4.0)
        ent, _, _ = model.model.patcher(ids_of(CALIBRATION), patch_size=None)
    model.config.patching_threshold = threshold_between(ent[0, 1:])
    return model


def threshold_between(entropies: torch.Tensor) -> float:
    """A threshold in the widest gap between sorted entropies around their 55-80% quantiles (patches of
    about 3 bytes): far from any entropy either implementation computes, even where repeated contexts
    give entropies that differ only by rounding."""
    values = entropies.double().sort().values
    lo, hi = int(len(values) * 0.55), int(len(values) * 0.8)
    i = lo + int((values[lo:hi] - values[lo - 1 : hi - 1]).argmax())
    return float((values[i - 1] + values[i]) / 2)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one CPU thread (and the suite shares CI machines); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory) -> tuple[BltForCausalLM, BLTModel, Path, str]:
    """(transformers model, the same checkpoint loaded by blt-decode, the save_pretrained directory, variant)."""
    if request.param == "windows" and not HAS_WINDOWS:
        pytest.skip(f"attention windows need transformers >= 5.23 (installed {transformers.__version__})")
    hf = build_hf(request.param)
    path = tmp_path_factory.mktemp(f"hf-{request.param}")
    hf.save_pretrained(path)
    ours = blt_decode.load_model(path)
    assert formats.detect_format(path) == "hf"
    return hf, ours, path, request.param


def hf_patch_lengths(hf: BltForCausalLM, ids: torch.Tensor) -> list[list[int]]:
    cfg = hf.config
    _, lengths, _ = hf.model.patcher(ids, patch_size=cfg.patch_size, threshold=cfg.patching_threshold,
                                     max_patch_length=cfg.max_patch_length)
    return lengths.tolist()


def our_patch_lengths(model: BLTModel, ids: torch.Tensor) -> list[list[int]]:
    return [patch_lengths(list(s), ids.shape[1]) for s in model.patch_layout(ids).starts]


SAMPLES = [b"", b"a", b"hello", CALIBRATION, bytes(range(256)), random_bytes(40, 1), random_bytes(150, 2),
           random_bytes(300, 3)]


def test_config_maps_every_field(pair):
    hf, ours, _, _ = pair
    c, h = ours.config, hf.config
    for mine, theirs in ((c.encoder, h.encoder_config), (c.decoder, h.decoder_config), (c.global_, h.global_config),
                         (c.entropy_model, h.patcher_config)):
        assert (mine.dim, mine.n_layers, mine.n_heads, mine.kv_heads, mine.ffn_dim) == (
            theirs.hidden_size, theirs.num_hidden_layers, theirs.num_attention_heads, theirs.num_key_value_heads,
            theirs.intermediate_size)
        assert mine.rope_theta == hf_theta(theirs)
        assert mine.norm_eps == theirs.rms_norm_eps
    assert c.patching_threshold == h.patching_threshold and c.cross_attn_k == h.cross_attn_k
    assert c.encoder_hash_byte_group_size == tuple(h.encoder_hash_byte_group_size)
    assert c.cross_attn_all_layers_decoder == h.decoder_config.cross_attn_all_layers
    if HAS_WINDOWS:
        assert c.encoder.sliding_window == c.decoder.sliding_window == h.local_attention_window_len
        assert c.entropy_model.sliding_window == h.patcher_config.sliding_window


@pytest.mark.parametrize("sample", range(len(SAMPLES)))
def test_patch_lengths_equal(pair, sample):
    hf, ours, _, _ = pair
    ids = ids_of(SAMPLES[sample])
    with torch.no_grad():
        assert our_patch_lengths(ours, ids) == hf_patch_lengths(hf, ids)


def test_patches_are_not_trivial(pair):
    """The threshold gives multi-byte patches, so the comparisons exercise real patch layouts."""
    _, ours, _, _ = pair
    with torch.no_grad():
        lengths = our_patch_lengths(ours, ids_of(random_bytes(300, 3) + CALIBRATION))[0]
    assert 1.5 < sum(lengths) / len(lengths) < 10


@pytest.mark.parametrize("sample", range(len(SAMPLES)))
def test_logits_equal(pair, sample):
    hf, ours, _, _ = pair
    ids = ids_of(SAMPLES[sample])
    with torch.no_grad():
        diff = (ours(ids) - hf(ids, use_cache=False).logits).abs().max().item()
    assert diff < TOL


def test_logits_equal_batched(pair):
    hf, ours, _, _ = pair
    ids = torch.cat([ids_of(random_bytes(120, s)) for s in (10, 11, 12)])
    with torch.no_grad():
        assert (ours(ids) - hf(ids, use_cache=False).logits).abs().max().item() < TOL


def our_greedy(model: BLTModel, prompt_ids: list[int], n: int) -> tuple[list[int], int]:
    """n greedy ids from the autoregressive strategy (KV-cached session) and the patches it closed."""
    strategy = plugins.get_strategy("autoregressive")
    opts = options.make_options(strategy, {"cache": "kv"})
    session = open_session(plugins.get_backend("eager"), model, len(prompt_ids) + n + 1)
    decoder = strategy.decode(session, DecodeContext(tuple(prompt_ids), n, torch.Generator().manual_seed(0)), opts)
    out: list[int] = []
    for chunk in decoder:
        out.extend(chunk)
        if len(out) >= n:
            break
    decoder.close()
    return out[:n], session.closed_patches


@torch.no_grad()
def hf_greedy(hf: BltForCausalLM, prompt_ids: list[int], n: int) -> list[int]:
    """Greedy decoding the way transformers' BLT generates: the whole forward re-run for every byte.

    blt-decode never emits BOE/BOS/PAD (sampling.NEVER_GENERATED, a generation policy, not part of the
    model); the same ids are suppressed here, as ``generate(suppress_tokens=...)`` does.
    """
    ids = torch.tensor([prompt_ids])
    for _ in range(n):
        logits = hf(ids, use_cache=False).logits[0, -1]
        logits[list(NEVER_GENERATED)] = float("-inf")
        ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
    return ids[0, len(prompt_ids):].tolist()


@torch.no_grad()
def hf_generate(hf: BltForCausalLM, prompt_ids: list[int], n: int) -> list[int]:
    """transformers' own greedy ``generate`` (no cache: its BLT forward is re-run for every byte)."""
    out = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                      use_cache=False, suppress_tokens=list(NEVER_GENERATED), eos_token_id=None, pad_token_id=PAD_ID)
    return out[0, len(prompt_ids):].tolist()


#: one prompt per variant keeps the suite fast: a text, a single NUL byte, random bytes
PROMPTS = {"plain": b"Once upon a time", "projection": random_bytes(20, 7), "windows": b"\x00"}


def test_greedy_generation_equal_64_bytes(pair):
    hf, ours, path, _ = pair
    prompt_ids = ids_of(PROMPTS[path.name.split("-")[1].rstrip("0123456789")])[0].tolist()
    mine, closed = our_greedy(ours, prompt_ids, 64)
    assert mine == hf_greedy(hf, prompt_ids, 64)
    assert closed >= 5  # the global model ran on several patches closed during generation


@pytest.mark.parametrize("pair", ["plain"], indirect=True)  # the per-byte loop above covers every variant
def test_greedy_generation_equal_transformers_generate(pair):
    hf, ours, _, _ = pair
    prompt_ids = ids_of(b"Once upon a time")[0].tolist()
    assert our_greedy(ours, prompt_ids, 64)[0] == hf_generate(hf, prompt_ids, 64)


def test_round_trip_hf_native_original_native_bit_identical(pair, tmp_path):
    hf, ours, _, variant = pair
    formats.save_checkpoint(ours, tmp_path / "native", "native")
    native = formats.load_checkpoint(tmp_path / "native")
    if variant != "plain":
        # the original entropy loader fixes the window at 512 (these variants use None and 6), and the
        # original args have one rotary base for all stacks: refused before writing, never approximated
        with pytest.raises(blt_decode.ConfigError, match="original entropy loader fixes sliding_window=512"):
            formats.save_checkpoint(native, tmp_path / "original", "original")
        assert not (tmp_path / "original").exists()
        return
    formats.save_checkpoint(native, tmp_path / "original", "original")
    back = formats.load_checkpoint(tmp_path / "original")
    formats.save_checkpoint(back, tmp_path / "native2", "native")
    final = formats.load_checkpoint(tmp_path / "native2")
    assert final.config == ours.config
    a, b = ours.state_dict(), final.state_dict()
    assert set(a) == set(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    first = load_file(str(tmp_path / "native" / "model.safetensors"))
    last = load_file(str(tmp_path / "native2" / "model.safetensors"))
    assert first.keys() == last.keys() and all(torch.equal(first[k], last[k]) for k in first)


def test_our_hf_export_loads_strictly_in_transformers(pair, tmp_path):
    hf, ours, _, _ = pair
    formats.save_checkpoint(ours, tmp_path / "hf", "hf")
    again, info = BltForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    a, b = hf.state_dict(), again.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    ids = ids_of(random_bytes(100, 5))
    with torch.no_grad():
        assert torch.equal(again.eval()(ids, use_cache=False).logits, hf(ids, use_cache=False).logits)


def test_max_patch_length_quirk(tmp_path):
    """With max_patch_length set, transformers' process_patch_lengths drops zero-length patches, and with
    them the decision that the patch holding the last byte is already closed (the next byte starts a new
    patch). Its last position then reads the latent of the patch before, so its output changes once the
    next byte is appended: non-causal. Every other position agrees with us, and its last position equals
    ours computed without that closing boundary. Our patcher keeps the causal semantics of the original
    generator (``patcher.patch(..., include_next_token=True)``)."""
    hf = build_hf("plain", seed=3, max_patch_length=2)
    hf.save_pretrained(tmp_path)
    ours = blt_decode.load_model(tmp_path)
    closed_at_end = 0
    with torch.no_grad():
        for seed in range(12):
            ids = ids_of(random_bytes(30 + seed, 100 + seed))
            layout = ours.patch_layout(ids)
            mine, theirs = our_patch_lengths(ours, ids)[0], hf_patch_lengths(hf, ids)[0]
            assert max(theirs) <= 2
            hf_logits, our_logits = hf(ids, use_cache=False).logits, ours(ids, layout)
            assert (our_logits[:, :-1] - hf_logits[:, :-1]).abs().max().item() < TOL
            if mine[-1] == 0:  # the last patch closed at the end of the sequence
                closed_at_end += 1
                assert mine[:-1] == theirs
                without = PatchLayout((layout.starts[0][:-1],), layout.entropies)
                assert (ours(ids, without)[:, -1] - hf_logits[:, -1]).abs().max().item() < TOL
                assert (our_logits[:, -1] - hf_logits[:, -1]).abs().max().item() > 1e-3
            else:
                assert mine == theirs
                assert (our_logits - hf_logits).abs().max().item() < TOL
    assert 0 < closed_at_end < 12


# -- transformers' conversion script ------------------------------------------------------------------
def synth_original(path: Path, seed: int = 0) -> dict:
    """A random checkpoint in the released original layout, written by hand (not by our writer)."""
    g = torch.Generator().manual_seed(seed)
    args = dict(
        vocab_size=260, dim=64, dim_global=64, dim_local_encoder=32, dim_local_decoder=32,
        n_layers_global=2, n_layers_local_encoder=1, n_layers_local_decoder=2,
        n_heads_global=4, n_heads_local_encoder=2, n_heads_local_decoder=2, n_kv_heads=None, n_kv_heads_global=None,
        multiple_of=32, ffn_dim_multiplier=1.0, norm_eps=1e-5, rope_theta=500000.0, max_seqlen=256,
        max_encoder_seq_length=2048, local_attention_window_len=512, patch_size=4.5, patching_mode="entropy",
        patching_threshold=1.3354, cross_attn_encoder=True, cross_attn_decoder=True, cross_attn_init_by_pooling=True,
        cross_attn_k=2, cross_attn_nheads=2, cross_attn_all_layers_encoder=False, cross_attn_all_layers_decoder=True,
        use_local_encoder_transformer=True, downsampling_by_pooling="max", encoder_hash_byte_group_size=[3, 4, 5],
        encoder_hash_byte_group_vocab=89, encoder_hash_byte_group_nb_functions=1, use_rope=True,
        pm_size=0, encoder_enable_byte_ngrams=False, share_encoder_decoder_emb=True, dim_token=None,
    )
    entropy_args = dict(dim=32, n_layers=2, n_heads=2, vocab_size=260, max_seqlen=8192, ffn_dim_multiplier=None,
                        multiple_of=32, sliding_window=512, attn_bias_type="local_block_causal")
    params = {"entropy_model": entropy_args, "data": {"patcher_args": {"threshold": 0.0, "patching_mode": "entropy",
                                                                       "max_patch_length": None}}}

    def block(prefix: str, dim: int, ffn: int) -> dict:
        shapes = {"attention.wq": (dim, dim), "attention.wk": (dim, dim), "attention.wv": (dim, dim),
                  "attention.wo": (dim, dim), "feed_forward.w1": (ffn, dim), "feed_forward.w3": (ffn, dim),
                  "feed_forward.w2": (dim, ffn), "attention_norm": (dim,), "ffn_norm": (dim,)}
        return {f"{prefix}.{k}.weight": s for k, s in shapes.items()}

    def cross(prefix: str, dim: int) -> dict:
        return {f"{prefix}.{k}.weight": ((dim,) if "norm" in k else (dim, dim))
                for k in ("wq", "wk", "wv", "wo", "cross_attn_norm_q", "cross_attn_norm_kv")}

    main_shapes = {"local_encoder.tok_embeddings.weight": (260, 32),
                   "local_encoder.patch_embedding_projection.weight": (64, 32),
                   "local_decoder.patch_embedding_projection.weight": (64, 64),
                   "local_decoder.norm.weight": (32,), "local_decoder.output.weight": (260, 32),
                   **{f"encoder_hash_tok_embedding.{i}.weight": (89, 32) for i in range(3)},
                   **block("local_encoder.layers.0", 32, 96), **cross("local_encoder.cross_attn_layers.0", 32),
                   **{k: v for i in range(2) for k, v in block(f"global_transformer.layers.{i}", 64, 192).items()},
                   **{k: v for i in range(2) for k, v in block(f"local_decoder.layers.{i}", 32, 96).items()},
                   **{k: v for i in range(2) for k, v in cross(f"local_decoder.cross_attn_layers.{i}", 32).items()}}
    entropy_shapes = {"tok_embeddings.weight": (260, 32), "norm.weight": (32,), "output.weight": (260, 32),
                      **{k: v for i in range(2) for k, v in block(f"layers.{i}", 32, 96).items()}}

    def rand(shapes: dict) -> dict:
        return {k: (1 + 0.2 * torch.randn(s, generator=g)) if len(s) == 1 else torch.randn(s, generator=g) * s[-1] ** -0.5
                for k, s in shapes.items()}

    main, entropy = rand(main_shapes), rand(entropy_shapes)
    entropy["output.weight"] *= 4.0  # spread the entropies (see build_hf)
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"args": args}))
    save_file(main, str(path / "model.safetensors"))
    (path / "entropy_model").mkdir()
    (path / "entropy_model" / "params.json").write_text(json.dumps(params))
    torch.save({"model": entropy}, path / "entropy_model" / "consolidated.pth")
    return {"args": args, "params": params, "main": main, "entropy": entropy}


def script_mapping(synth: dict) -> tuple[dict, dict]:
    """(config dict, state dict) following the rules of transformers' convert_blt_weights_to_hf.py:
    substring renames, the entropy model under ``patcher.``, the decoder output moved to ``lm_head``,
    a ``model.`` prefix, hash tables stacked in table order; config sizes from multiple_of."""
    a, em = synth["args"], synth["params"]["entropy_model"]

    def width(dim: int, multiple_of: int) -> int:
        return multiple_of * ((int(8 * dim / 3) + multiple_of - 1) // multiple_of)

    def sub(dim: int, layers: int, heads: int, theta: float, multiple_of: int, **kw) -> dict:
        return dict(hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads, rope_theta=theta,
                    intermediate_size=width(dim, multiple_of), **kw)

    config = dict(
        vocab_size=a["vocab_size"], patching_mode="entropy", patch_size=int(a["patch_size"]),
        patching_threshold=synth["params"]["data"]["patcher_args"]["threshold"],
        max_patch_length=synth["params"]["data"]["patcher_args"]["max_patch_length"], cross_attn_k=a["cross_attn_k"],
        encoder_hash_byte_group_size=a["encoder_hash_byte_group_size"],
        encoder_hash_byte_group_vocab=a["encoder_hash_byte_group_vocab"],
        encoder_hash_byte_group_nb_functions=a["encoder_hash_byte_group_nb_functions"], tie_word_embeddings=False,
        patcher_config=sub(em["dim"], em["n_layers"], em["n_heads"], em.get("rope_theta", 10000.0), em["multiple_of"], vocab_size=260),
        encoder_config=sub(a["dim_local_encoder"], a["n_layers_local_encoder"], a["n_heads_local_encoder"], a["rope_theta"], a["multiple_of"],
                           cross_attn_k=a["cross_attn_k"], hidden_size_global=a["dim_global"], cross_attn_all_layers=a["cross_attn_all_layers_encoder"]),
        decoder_config=sub(a["dim_local_decoder"], a["n_layers_local_decoder"], a["n_heads_local_decoder"], a["rope_theta"], a["multiple_of"],
                           cross_attn_k=a["cross_attn_k"], hidden_size_global=a["dim_global"], cross_attn_all_layers=a["cross_attn_all_layers_decoder"]),
        global_config=sub(a["dim_global"], a["n_layers_global"], a["n_heads_global"], a["rope_theta"], a["multiple_of"]),
    )
    renames = [(".attention.", ".self_attn."), (".feed_forward.", ".mlp."), (".attention_norm.", ".input_layernorm."),
               (".ffn_norm.", ".post_attention_layernorm."), (".tok_embeddings.", ".embed_tokens."),
               (".cross_attn_norm_q.", ".q_norm."), (".cross_attn_norm_kv.", ".k_norm."), (".w1.", ".gate_proj."),
               (".w2.", ".down_proj."), (".w3.", ".up_proj."), (".wq.", ".q_proj."), (".wk.", ".k_proj."),
               (".wv.", ".v_proj."), (".wo.", ".o_proj."), (".output.", ".lm_head.")]
    merged = {**synth["main"], **{f"patcher.{k}": v for k, v in synth["entropy"].items()}}
    renamed = {}
    for key, tensor in merged.items():
        for old, new in renames:
            key = key.replace(old, new)
        renamed[key] = tensor
    renamed["lm_head.weight"] = renamed.pop("local_decoder.lm_head.weight")
    hashes = sorted((k for k in renamed if k.startswith("encoder_hash_tok_embedding.")), key=lambda k: int(k.split(".")[-2]))
    fused = torch.cat([renamed.pop(k) for k in hashes])
    state = {k if k == "lm_head.weight" else f"model.{k}": v for k, v in renamed.items()}
    state["model.encoder_hash_tok_embedding.weight"] = fused
    return config, state


def calibrate_original(path: Path, synth: dict) -> None:
    """Set the patcher threshold of a synthesized original checkpoint so that patches span several bytes."""
    with torch.no_grad():
        ent = blt_decode.load_model(path).entropies(ids_of(CALIBRATION))[0, 1:]
    synth["params"]["data"]["patcher_args"]["threshold"] = threshold_between(ent)
    (path / "entropy_model" / "params.json").write_text(json.dumps(synth["params"]))


def test_original_loader_agrees_with_conversion_script(tmp_path):
    synth = synth_original(tmp_path / "orig")
    calibrate_original(tmp_path / "orig", synth)
    config_dict, script_state = script_mapping(synth)

    ours = blt_decode.load_model(tmp_path / "orig")
    assert ours.config.patching_threshold == synth["params"]["data"]["patcher_args"]["threshold"]
    assert formats.detect_format(tmp_path / "orig") == "original"
    # same tensors under the same names as the script produces
    formats.save_checkpoint(ours, tmp_path / "hf", "hf")
    exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert exported.keys() == script_state.keys()
    assert all(torch.equal(exported[k], script_state[k]) for k in script_state)

    # the script's checkpoint runs in transformers exactly as ours runs the original files
    hf_config = HFConfig(**config_dict)
    hf = BltForCausalLM(hf_config).eval()
    hf.load_state_dict(script_state, strict=True)
    for c, h in ((ours.config.encoder, hf_config.encoder_config), (ours.config.global_, hf_config.global_config),
                 (ours.config.entropy_model, hf_config.patcher_config)):
        assert (c.ffn_dim, c.rope_theta) == (h.intermediate_size, hf_theta(h))
    with torch.no_grad():
        for seed in range(3):
            ids = ids_of(random_bytes(90, seed))
            assert our_patch_lengths(ours, ids) == hf_patch_lengths(hf, ids)
            assert (ours(ids) - hf(ids, use_cache=False).logits).abs().max().item() < TOL
        assert max(our_patch_lengths(ours, ids_of(CALIBRATION))[0]) > 1


def test_original_training_layout_loads_like_released(tmp_path):
    synth_original(tmp_path / "released")
    released = blt_decode.load_model(tmp_path / "released")
    original.save_original(released, tmp_path / "train", layout="training")
    assert formats.detect_format(tmp_path / "train") == "original-train"
    train = blt_decode.load_model(tmp_path / "train")
    assert train.config == released.config
    a, b = released.state_dict(), train.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- speed side by side -------------------------------------------------------------------------------
def test_speed_side_by_side(tmp_path):
    """Bytes/s of our cached autoregressive greedy vs transformers' greedy generation (its generate() and
    a plain per-byte forward loop), in one run, on one model loaded from the HF layout, same prompt and
    length. One CPU thread (the numbers are then less at the mercy of other processes); best of
    BLT_BENCH_REPEATS runs (default 1) of BLT_BENCH_BYTES bytes (default 64). Run with ``-s`` to see the
    numbers. Asserts only that all three produce the same bytes."""
    n = int(os.environ.get("BLT_BENCH_BYTES", "64"))
    repeats = int(os.environ.get("BLT_BENCH_REPEATS", "1"))
    hf = build_hf("plain")
    hf.save_pretrained(tmp_path)
    ours = blt_decode.load_model(tmp_path)
    prompt_ids = ids_of(b"The Byte Latent Transformer reads raw bytes and groups them into patches. ")[0].tolist()
    runs = {"blt-decode cached AR": lambda: our_greedy(ours, prompt_ids, n)[0],
            "transformers generate()": lambda: hf_generate(hf, prompt_ids, n),
            "transformers forward loop": lambda: hf_greedy(hf, prompt_ids, n)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        our_greedy(ours, prompt_ids, 4), hf_greedy(hf, prompt_ids, 4), hf_generate(hf, prompt_ids, 4)  # warm-up
        best: dict[str, float] = {}
        outputs = {}
        for _ in range(repeats):
            for name, run in runs.items():  # interleaved, so that load changes hit all three alike
                start = time.perf_counter()
                outputs[name] = run()
                best[name] = max(best.get(name, 0.0), n / (time.perf_counter() - start))
    finally:
        torch.set_num_threads(threads)
    assert len({tuple(o) for o in outputs.values()}) == 1
    base = best["transformers generate()"]
    print(f"\n[speed] {n} bytes after a {len(prompt_ids) - 1}-byte prompt, best of {repeats}, 1 CPU thread, "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    for name, bps in best.items():
        print(f"[speed] {name:<26} {bps:8.1f} bytes/s  ({bps / base:.2f}x transformers generate())")
