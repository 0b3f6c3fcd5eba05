"""The Hugging Face transformers layout (``BltForCausalLM``): ``config.json`` with ``encoder_config``,
``global_config``, ``decoder_config`` and ``patcher_config`` + ``model.safetensors`` (or a sharded
``model.safetensors.index.json``), the entropy model inside under ``model.patcher.*``.

Reading follows what transformers does with the same files (defaults included), except where the
released checkpoints behave differently; each such case is listed in docs/checkpoints.md.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from blt_decode.errors import CheckpointError, ConfigError
from blt_decode.model.config import BLTConfig, TransformerConfig
from blt_decode.checkpoints._common import (
    FieldReader,
    build_config,
    build_model,
    check_tensors,
    cpu_state_dict,
    expected_shapes,
    read_json,
    read_safetensors,
)
from blt_decode.model.blt import BLTModel
from blt_decode.model.tokenizer import BOS_ID, EOS_ID, VOCAB_SIZE

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SUB_CONFIGS = ("encoder_config", "decoder_config", "global_config", "patcher_config")

#: transformers' defaults for fields a config.json may omit (configuration_blt.py, transformers 5.23)
DEFAULT_THETA = 500000.0  # BltLocalEncoderConfig / BltLocalDecoderConfig / BltGlobalTransformerConfig
DEFAULT_PATCHER_THETA = 10000.0  # BltPatcherConfig has no default_theta of its own
DEFAULT_LOCAL_WINDOW = 512  # BltConfig.local_attention_window_len (absent before transformers 5.23)
DEFAULT_PATCHER_WINDOW = 512  # BltPatcherConfig.sliding_window (absent before transformers 5.23)
DEFAULT_THRESHOLD = 1.335442066192627

# Block and cross-attention parameter names: ours (the original code's) -> transformers'
_BLOCK_NAMES = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_CROSS_NAMES = {
    "cross_attn_norm_q": "q_norm",
    "cross_attn_norm_kv": "k_norm",
    "wq": "q_proj",
    "wk": "k_proj",
    "wv": "v_proj",
    "wo": "o_proj",
}
_FIXED_NAMES = {
    "local_encoder.tok_embeddings.weight": "model.local_encoder.embed_tokens.weight",
    "local_decoder.output.weight": "lm_head.weight",
    "entropy_model.tok_embeddings.weight": "model.patcher.embed_tokens.weight",
    "entropy_model.norm.weight": "model.patcher.norm.weight",
    "entropy_model.output.weight": "model.patcher.lm_head.weight",
}
_STACKS = {"local_encoder": "local_encoder", "local_decoder": "local_decoder",
           "global_transformer": "global_transformer", "entropy_model": "patcher"}
_LAYER = re.compile(r"^(local_encoder|local_decoder|global_transformer|entropy_model)\.layers\.(\d+)\.(.+)\.weight$")
_CROSS = re.compile(r"^(local_encoder|local_decoder)\.cross_attn_layers\.(\d+)\.(.+)\.weight$")
_HASH = re.compile(r"^encoder_hash_tok_embedding\.(\d+)\.weight$")
FUSED_HASH = "model.encoder_hash_tok_embedding.weight"


def hf_name(name: str) -> str:
    """The transformers name of one of our parameters (the hash tables are fused separately)."""
    if name in _FIXED_NAMES:
        return _FIXED_NAMES[name]
    if m := _LAYER.match(name):
        stack, layer, rest = m.groups()
        if rest not in _BLOCK_NAMES:
            raise KeyError(name)
        return f"model.{_STACKS[stack]}.layers.{layer}.{_BLOCK_NAMES[rest]}.weight"
    if m := _CROSS.match(name):
        stack, layer, rest = m.groups()
        if rest not in _CROSS_NAMES:
            raise KeyError(name)
        return f"model.{stack}.cross_attn_layers.{layer}.{_CROSS_NAMES[rest]}.weight"
    if _HASH.match(name):
        raise KeyError(f"{name} is part of the fused {FUSED_HASH}")
    # patch_embedding_projection, token_embedding_projection, local_decoder.norm keep their names
    return f"model.{name}"


def name_map(native_names: list[str]) -> dict[str, str]:
    """Our name -> transformers name, for every parameter except the hash tables."""
    return {n: hf_name(n) for n in native_names if not _HASH.match(n)}


# -- config -------------------------------------------------------------------------------------------
def _theta(sub: FieldReader, default: float) -> float:
    """Rotary base as transformers resolves it: ``rope_parameters.rope_theta``, else the legacy
    ``rope_theta`` key, else the class default. Only the default rope type is implemented."""
    params = sub.raw("rope_parameters", None) or sub.raw("rope_scaling", None)
    if params is not None:
        if not isinstance(params, dict):
            raise sub.fail("rope_parameters", f"must be an object, got {params!r}")
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            raise sub.fail("rope_parameters.rope_type", f"is {rope_type!r}; blt-decode supports only 'default'")
        if "rope_theta" in params:
            return FieldReader(params, sub.source, sub.where("rope_parameters.")).float("rope_theta", positive=True)
    return sub.float("rope_theta", default, positive=True)


def _norm_eps(sub: FieldReader) -> float:
    """``rms_norm_eps``; a config written by transformers' conversion script names it ``norm_eps``, which
    transformers ignores (keeping 1e-5) but the original model was run with (see docs/checkpoints.md)."""
    if sub.has("rms_norm_eps"):
        return sub.float("rms_norm_eps", positive=True)
    return sub.float("norm_eps", 1e-5, positive=True)


def _stack(sub: FieldReader, theta_default: float, window: int | None) -> TransformerConfig:
    sub.require("hidden_act", "silu", "silu")
    heads = sub.int("num_attention_heads", minimum=1)
    kv = sub.int("num_key_value_heads", None, minimum=1, optional=True)
    # the fields are read (and their errors raised, naming file and field) before the constructor runs, so
    # that only the constructor's cross-field checks get the sub-config's name put in front
    fields = dict(
        dim=sub.int("hidden_size", minimum=1),
        n_layers=sub.int("num_hidden_layers", minimum=0),
        n_heads=heads,
        ffn_dim=sub.int("intermediate_size", minimum=1),
        # canonical form: None when every head has its own keys/values
        n_kv_heads=None if kv in (None, heads) else kv,
        sliding_window=window,
        rope_theta=_theta(sub, theta_default),
        norm_eps=_norm_eps(sub),
    )
    try:
        return TransformerConfig(**fields)
    except ConfigError as exc:
        raise CheckpointError(f"{sub.source}: {sub.prefix.rstrip('.')}: {exc}") from None


def config_from_hf(data: dict[str, Any], source: str) -> BLTConfig:
    """Our config from a transformers ``BltConfig`` JSON object."""
    top = FieldReader(data, source)
    model_type = top.raw("model_type", None)
    if model_type != "blt":
        raise top.fail("model_type", f"is {model_type!r}, expected 'blt'")
    top.require("patch_in_forward", True, True, "without the patcher transformers makes every byte a patch")
    top.require("patching_mode", "entropy", "entropy")
    if top.raw("patch_size", 4) is None:
        # transformers' BltPatcher thresholds entropies only when patch_size is set; with null every byte
        # becomes its own patch
        raise top.fail("patch_size", "is null; transformers then makes every byte a patch, which blt-decode does not implement")
    vocab = top.int("vocab_size", VOCAB_SIZE)
    if vocab != VOCAB_SIZE:
        raise top.fail("vocab_size", f"must be {VOCAB_SIZE}, got {vocab}")

    enc, dec, glob, pat = (top.sub(k) for k in SUB_CONFIGS)
    k = top.int("cross_attn_k", 2, minimum=1)
    for sub in (enc, dec):
        if sub.int("cross_attn_k", 2, minimum=1) != k:
            raise sub.fail("cross_attn_k", f"is {sub.raw('cross_attn_k', 2)}, but the top-level cross_attn_k is {k}")
        sub_vocab = sub.int("vocab_size", VOCAB_SIZE)
        if sub_vocab != VOCAB_SIZE:
            raise sub.fail("vocab_size", f"must be {VOCAB_SIZE}, got {sub_vocab}")
    enc.require("cross_attn_all_layers", False, False, "the released models cross-attend after the last encoder layer only")

    # transformers applies local_attention_window_len to the encoder *and* the decoder (the decoder's
    # mask is built from encoder_config); absent before transformers 5.23, where it means 512 now
    local_window = top.int("local_attention_window_len", DEFAULT_LOCAL_WINDOW, minimum=1, optional=True)
    encoder = _stack(enc, DEFAULT_THETA, local_window)
    decoder = _stack(dec, DEFAULT_THETA, local_window)
    global_ = _stack(glob, DEFAULT_THETA, None)  # transformers' global model is always fully causal
    entropy = _stack(pat, DEFAULT_PATCHER_THETA, pat.int("sliding_window", DEFAULT_PATCHER_WINDOW, minimum=1, optional=True))
    pat_vocab = pat.int("vocab_size", VOCAB_SIZE)
    if pat_vocab != VOCAB_SIZE:
        raise pat.fail("vocab_size", f"must be {VOCAB_SIZE}, got {pat_vocab}")

    for sub, cfg in ((enc, encoder), (dec, decoder)):
        # transformers' cross-attention uses the stack's own heads and key/value heads
        if cfg.kv_heads != cfg.n_heads:
            raise sub.fail("num_key_value_heads", f"is {cfg.kv_heads}; blt-decode's cross-attention needs it equal to num_attention_heads ({cfg.n_heads})")
    if encoder.n_heads != decoder.n_heads:
        raise dec.fail("num_attention_heads", f"is {decoder.n_heads}; blt-decode needs the encoder's and decoder's cross-attention heads equal (encoder: {encoder.n_heads})")
    global_in = dec.int("hidden_size_global", 2048, minimum=1)
    if global_in != global_.dim:
        raise dec.fail("hidden_size_global", f"is {global_in}, but global_config.hidden_size is {global_.dim}")
    if encoder.n_layers < 1:
        raise enc.fail("num_hidden_layers", "must be >= 1: the patch cross-attention runs after the last encoder layer")

    sizes = top.raw("encoder_hash_byte_group_size", None)
    if sizes is None:
        sizes = [3, 4, 5, 6, 7, 8]  # BltConfig.__post_init__ default
    if not isinstance(sizes, list) or not all(isinstance(n, int) and not isinstance(n, bool) for n in sizes):
        raise top.fail("encoder_hash_byte_group_size", f"must be a list of integers, got {sizes!r}")
    return build_config(
        source,
        encoder=encoder,
        global_=global_,
        decoder=decoder,
        entropy_model=entropy,
        cross_attn_k=k,
        cross_attn_nheads=None,
        cross_attn_all_layers_decoder=dec.bool("cross_attn_all_layers", True),
        encoder_hash_byte_group_size=tuple(sizes),
        encoder_hash_byte_group_vocab=top.int("encoder_hash_byte_group_vocab", 500002, minimum=1),
        encoder_hash_byte_group_nb_functions=top.int("encoder_hash_byte_group_nb_functions", 1, minimum=0),
        patching_mode="entropy",
        patching_threshold=top.float("patching_threshold", DEFAULT_THRESHOLD),
        max_patch_length=top.int("max_patch_length", None, minimum=1, optional=True),
        max_seqlen=enc.int("max_position_embeddings", 24576, minimum=1),
    )


def _unsupported(problem: str) -> ConfigError:
    return ConfigError(f"cannot write this model in the Hugging Face layout: {problem}")


def config_to_hf(config: BLTConfig, dtype: torch.dtype) -> dict[str, Any]:
    """A transformers ``BltConfig`` JSON object for ``config``; fails on what transformers cannot express."""
    enc, dec, glob, ent = config.encoder, config.decoder, config.global_, config.entropy_model
    if config.patching_mode != "entropy" or ent is None:
        raise _unsupported("transformers implements entropy patching only (this model uses static patching)")
    if enc.sliding_window != dec.sliding_window:
        raise _unsupported(f"transformers has one local attention window for encoder and decoder "
                           f"(encoder: {enc.sliding_window}, decoder: {dec.sliding_window})")
    if glob.sliding_window is not None:
        raise _unsupported(f"transformers' global model is fully causal (this one has window {glob.sliding_window})")
    for name, stack in (("encoder", enc), ("decoder", dec)):
        if stack.kv_heads != stack.n_heads or config.cross_heads != stack.n_heads:
            raise _unsupported(f"transformers' {name} cross-attention uses the {name}'s heads and key/value heads; "
                               f"needs n_heads = n_kv_heads = cross_attn_nheads (got {stack.n_heads}, "
                               f"{stack.kv_heads}, {config.cross_heads})")
    if enc.n_layers < 1:
        raise _unsupported("transformers' encoder needs at least one layer (the patch cross-attention runs after it)")

    def stack(cfg: TransformerConfig, model_type: str, **extra: Any) -> dict[str, Any]:
        return {
            "model_type": model_type,
            "hidden_size": cfg.dim,
            "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.kv_heads,
            "intermediate_size": cfg.ffn_dim,
            "rms_norm_eps": cfg.norm_eps,
            # transformers >= 5 reads rope_parameters; 4.x reads rope_theta
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "rope_theta": cfg.rope_theta,
            "hidden_act": "silu",
            "max_position_embeddings": config.max_seqlen,
            "dropout": 0.0,
            **extra,
        }

    local = {"vocab_size": config.vocab_size, "cross_attn_k": config.cross_attn_k, "hidden_size_global": glob.dim}
    return {
        "architectures": ["BltForCausalLM"],
        "model_type": "blt",
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_seqlen,
        "patch_in_forward": True,
        "patching_mode": "entropy",
        "patch_size": 4,  # any non-null value: transformers then thresholds the entropies
        "patching_threshold": config.patching_threshold,
        "patching_batch_size": 1,
        "max_patch_length": config.max_patch_length,
        "local_attention_window_len": enc.sliding_window,
        "cross_attn_k": config.cross_attn_k,
        "encoder_hash_byte_group_size": list(config.encoder_hash_byte_group_size),
        "encoder_hash_byte_group_vocab": config.encoder_hash_byte_group_vocab,
        "encoder_hash_byte_group_nb_functions": config.encoder_hash_byte_group_nb_functions,
        "encoder_config": stack(enc, "blt_local_encoder", cross_attn_all_layers=False, sliding_window=enc.sliding_window, **local),
        "decoder_config": stack(dec, "blt_local_decoder", cross_attn_all_layers=config.cross_attn_all_layers_decoder, **local),
        "global_config": stack(glob, "blt_global_transformer"),
        "patcher_config": stack(ent, "blt_patcher", vocab_size=config.vocab_size, sliding_window=ent.sliding_window),
        "tie_word_embeddings": False,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "dtype": str(dtype).removeprefix("torch."),
    }


# -- tensors ------------------------------------------------------------------------------------------
def hf_expected_shapes(config: BLTConfig) -> dict[str, tuple[int, ...]]:
    """Transformers name -> shape of every tensor of a model with ``config``, the hash tables fused in one."""
    native = expected_shapes(config)
    shapes = {hf: native[n] for n, hf in name_map(list(native)).items()}
    shapes[FUSED_HASH] = (config.n_hash_tables * config.encoder_hash_byte_group_vocab, config.encoder.dim)
    return shapes


def state_dict_to_hf(tensors: dict[str, torch.Tensor], config: BLTConfig) -> dict[str, torch.Tensor]:
    """Our tensors (native names) under transformers' names, the hash tables concatenated into one."""
    out = {hf: tensors[n] for n, hf in name_map(list(tensors)).items()}
    # transformers keeps all hash tables in one embedding: table i owns rows [i*vocab, (i+1)*vocab)
    tables = [tensors[f"encoder_hash_tok_embedding.{i}.weight"] for i in range(config.n_hash_tables)]
    out[FUSED_HASH] = (torch.cat(tables, dim=0) if tables
                       else torch.zeros(0, config.encoder.dim, dtype=tensors["local_encoder.tok_embeddings.weight"].dtype))
    return out


def state_dict_from_hf(tensors: dict[str, torch.Tensor], config: BLTConfig, source: str) -> dict[str, torch.Tensor]:
    """Our tensors from transformers' (checked first, so errors use the names found in the file)."""
    check_tensors(hf_expected_shapes(config), tensors, source)
    native_names = list(expected_shapes(config))
    out = {n: tensors[hf] for n, hf in name_map(native_names).items()}
    fused = tensors[FUSED_HASH]
    vocab = config.encoder_hash_byte_group_vocab
    for i in range(config.n_hash_tables):
        # views: build_model copies every tensor into its own aligned allocation (a clone here would copy
        # the largest tensor of the model twice)
        out[f"encoder_hash_tok_embedding.{i}.weight"] = fused[i * vocab : (i + 1) * vocab]
    return out


# -- files --------------------------------------------------------------------------------------------
def is_hf_checkpoint(path: Path, config: dict[str, Any] | None) -> bool:
    """Whether the directory ``path``, whose parsed ``config.json`` is ``config`` (None without one), is in
    the transformers layout: weights (single file or index) and a BLT config."""
    if config is None:
        return False
    has_weights = (path / WEIGHTS_FILE).is_file() or (path / INDEX_FILE).is_file()
    return has_weights and (config.get("model_type") == "blt" or any(k in config for k in SUB_CONFIGS))


def _hub_blobs(path: Path) -> Path | None:
    """The ``blobs`` directory of a Hugging Face hub cache entry when ``path`` is one of its snapshots.

    The hub cache keeps ``models--org--name/snapshots/<revision>/<file>`` as symlinks to
    ``models--org--name/blobs/<hash>``: a snapshot's shards legitimately resolve outside the snapshot.
    """
    if path.parent.name == "snapshots" and (path.parent.parent / "blobs").is_dir():
        return path.parent.parent / "blobs"
    return None


def shard_path(path: Path, index_path: Path, tensor: str, shard: Any) -> Path:
    """The file a ``weight_map`` entry names, which must be a relative file name inside the checkpoint.

    The index is data from the checkpoint: an entry such as ``../other/model.safetensors``, an absolute path
    or a symlink that resolves elsewhere would make loading read a file the checkpoint does not hold. The
    one exception is the hub cache layout (see :func:`_hub_blobs`).
    """
    if not isinstance(shard, str) or not shard:
        raise CheckpointError(f"{index_path}: weight_map entry {tensor!r} must be a shard file name, got {shard!r}")
    root = path.resolve()
    target = (path / shard).resolve()
    allowed = [root] + [blobs for blobs in [_hub_blobs(root)] if blobs is not None]
    if Path(shard).is_absolute() or not any(target.is_relative_to(a) for a in allowed):
        raise CheckpointError(
            f"{index_path}: weight_map entry {tensor!r} names {shard!r}, outside the checkpoint directory "
            f"(resolves to {target}); shards must be files inside the directory"
        )
    return path / shard


def read_hf_tensors(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """All tensors of a transformers checkpoint directory (single file or sharded with an index)."""
    if (path / WEIGHTS_FILE).is_file():
        return read_safetensors(path / WEIGHTS_FILE), str(path / WEIGHTS_FILE)
    index_path = path / INDEX_FILE
    index = read_json(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path} has no 'weight_map' object")
    # every entry is checked before any shard is read
    shards: dict[str, set[str]] = {}
    for tensor, shard in weight_map.items():
        shard_path(path, index_path, tensor, shard)
        shards.setdefault(shard, set()).add(tensor)
    tensors: dict[str, torch.Tensor] = {}
    for shard, listed in sorted(shards.items()):
        part = read_safetensors(path / shard)
        absent = sorted(listed - set(part))
        if absent:
            raise CheckpointError(f"{path / shard}: missing tensor {absent[0]!r} (listed in {index_path.name})")
        tensors.update(part)
    return tensors, str(index_path)


def load_hf(path: Path, *, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> BLTModel:
    """The model of a transformers checkpoint directory, every tensor checked. ``dtype`` defaults to float32."""
    config = config_from_hf(read_json(path / CONFIG_FILE), str(path / CONFIG_FILE))
    tensors, source = read_hf_tensors(path)
    native = state_dict_from_hf(tensors, config, source)
    return build_model(config, native, source, dtype=dtype, device=device)


def save_hf(model: BLTModel, path: Path) -> Path:
    """Write ``model`` to the directory ``path`` (created if needed) in the transformers layout; returns ``path``.
    A model transformers cannot express raises :class:`~blt_decode.errors.ConfigError` before anything is written."""
    config = config_to_hf(model.config, model.dtype)  # fails before anything is written
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    save_file(state_dict_to_hf(cpu_state_dict(model), model.config), str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    return path
