"""The original facebookresearch/blt layouts: as released (``facebook/blt-1b``, ``facebook/blt-7b``) and the
training checkpoint (files, parameter names, config fields: docs/checkpoints.md)."""

from __future__ import annotations

import json
import math
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
    read_torch_weights,
    state_dict_from_pth,
)
from blt_decode.model.blt import BLTModel
from blt_decode.model.tokenizer import VOCAB_SIZE

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TRAIN_PARAMS_FILE = "params.json"
TRAIN_WEIGHTS_FILE = "consolidated.pth"
ENTROPY_DIR = "entropy_model"
ENTROPY_PARAMS_FILE = "params.json"
ENTROPY_WEIGHTS_FILE = "consolidated.pth"
ENTROPY_PREFIX = "entropy_model."

#: what bytelatent/entropy_model.py::load_entropy_model uses regardless of params.json
ENTROPY_LOADER_WINDOW = 512
ENTROPY_LOADER_THETA = 10000.0
ENTROPY_LOADER_NORM_EPS = 1e-5
#: PatcherArgs.threshold default in bytelatent/data/patcher.py
DEFAULT_THRESHOLD = 1.335442066192627


def ffn_dim(dim: int, multiple_of: int, multiplier: float | None) -> int:
    """The original FeedForward width: hidden = int(2 * 4d / 3), scaled, rounded up to ``multiple_of``."""
    hidden = int(2 * (4 * dim) / 3)
    if multiplier is not None:
        hidden = int(multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _ffn_dim(reader: FieldReader, dim_key: str, dim: int, multiple_of: int, multiplier: float | None) -> int:
    """:func:`ffn_dim` for a config file: a width too large to compute is the config's error."""
    try:
        return ffn_dim(dim, multiple_of, multiplier)
    except OverflowError:
        raise reader.fail("ffn_dim_multiplier", f"is {multiplier!r}: with {dim_key} = {dim} the FFN width "
                          "overflows") from None


# -- reading configs ----------------------------------------------------------------------------------
def _hash_sizes(args: FieldReader) -> tuple[int, ...]:
    value = args.raw("encoder_hash_byte_group_size")
    if isinstance(value, str):  # the original args also accept "3,4,5"
        try:
            return tuple(int(x) for x in value.split(",") if x)
        except ValueError:
            raise args.fail("encoder_hash_byte_group_size", f"must list integers, got {value!r}") from None
    if not isinstance(value, list) or not all(isinstance(n, int) and not isinstance(n, bool) for n in value):
        raise args.fail("encoder_hash_byte_group_size", f"must be a list of integers, got {value!r}")
    return tuple(value)


def _transformer(reader: FieldReader, what: str, **kwargs: Any) -> TransformerConfig:
    try:
        return TransformerConfig(**kwargs)
    except (ConfigError, ValueError) as exc:
        raise CheckpointError(f"{reader.source}: {what}: {exc}") from None


def _kv(value: int | None, heads: int) -> int | None:
    return None if value in (None, heads) else value


def entropy_config(params: FieldReader) -> TransformerConfig:
    """The entropy model's stack from entropy_model/params.json (``entropy_model`` or older ``model`` key)."""
    em = params.sub("entropy_model") if params.has("entropy_model") else params.sub("model")
    vocab = em.int("vocab_size")
    if vocab != VOCAB_SIZE:
        raise em.fail("vocab_size", f"must be {VOCAB_SIZE}, got {vocab}")
    dim = em.int("dim", minimum=1)
    heads = em.int("n_heads", minimum=1)
    head_dim = em.int("head_dim", None, minimum=1, optional=True)
    if head_dim is not None and head_dim * heads != dim:
        raise em.fail("head_dim", f"is {head_dim}; blt-decode needs dim / n_heads = {dim // heads}")
    # multiple_of and n_kv_heads decide tensor shapes, so a loadable checkpoint agrees with params.json on them
    width = _ffn_dim(em, "dim", dim, em.int("multiple_of", 256, minimum=1),
                     em.float("ffn_dim_multiplier", None, positive=True, optional=True))
    return _transformer(
        params, "entropy model",
        dim=dim, n_layers=em.int("n_layers", minimum=0), n_heads=heads, ffn_dim=width,
        n_kv_heads=_kv(em.int("n_kv_heads", None, minimum=1, optional=True), heads),
        sliding_window=ENTROPY_LOADER_WINDOW, rope_theta=ENTROPY_LOADER_THETA, norm_eps=ENTROPY_LOADER_NORM_EPS,
    )


def config_from_original(args: FieldReader, patching: "PatchingFields", entropy: TransformerConfig | None) -> BLTConfig:
    """Our config from ByteLatentTransformerArgs (``args``) and the patcher settings."""
    # Features our model does not implement: fail rather than run a different architecture.
    for key, expected, default in (
        ("cross_attn_encoder", True, False), ("cross_attn_decoder", True, False),
        ("cross_attn_init_by_pooling", True, False), ("use_local_encoder_transformer", True, False),
        ("downsampling_by_pooling", "max", None), ("cross_attn_all_layers_encoder", False, False),
        ("use_rope", True, True), ("encoder_enable_byte_ngrams", False, False),
        ("encoder_ngram_to_size_str", None, None), ("pm_size", 0, 0),
        ("cross_attn_window_encoder", None, None), ("cross_attn_window_decoder", None, None),
        ("norm_type", "rmsnorm", "rmsnorm"), ("non_linearity", "swiglu", "swiglu"),
        ("weight_tying", False, False), ("tie_local_encoder_decoder", False, False),
    ):
        args.require(key, expected, default)
    vocab = args.int("vocab_size")
    if vocab != VOCAB_SIZE:
        raise args.fail("vocab_size", f"must be {VOCAB_SIZE}, got {vocab}")

    multiple_of = args.int("multiple_of", 256, minimum=1)
    multiplier = args.float("ffn_dim_multiplier", 1.0, positive=True, optional=True)
    theta = args.float("rope_theta", 10000.0, positive=True)
    eps = args.float("norm_eps", 1e-5, positive=True)
    head_dim = args.int("head_dim", None, minimum=1, optional=True)
    window = args.int("local_attention_window_len", None, minimum=1, optional=True)
    local_kv = args.int("n_kv_heads", None, minimum=1, optional=True)

    def stack(dim_key: str, layers_key: str, heads_key: str, kv: int | None, win: int | None) -> TransformerConfig:
        dim = args.int(dim_key, minimum=1)
        heads = args.int(heads_key, minimum=1)
        if head_dim is not None and head_dim * heads != dim:
            raise args.fail("head_dim", f"is {head_dim}; blt-decode needs {dim_key} / {heads_key} = {dim // heads}")
        return _transformer(
            args, dim_key, dim=dim, n_layers=args.int(layers_key, minimum=0), n_heads=heads,
            ffn_dim=_ffn_dim(args, dim_key, dim, multiple_of, multiplier), n_kv_heads=_kv(kv, heads), sliding_window=win,
            rope_theta=theta, norm_eps=eps,
        )

    encoder = stack("dim_local_encoder", "n_layers_local_encoder", "n_heads_local_encoder", local_kv, window)
    decoder = stack("dim_local_decoder", "n_layers_local_decoder", "n_heads_local_decoder", local_kv, window)
    # the global model never has a window (create_global_transformer sets local_attention_window_len=None)
    global_ = stack("dim_global", "n_layers_global", "n_heads_global",
                    args.int("n_kv_heads_global", None, minimum=1, optional=True), None)
    dim_token = args.int("dim_token", None, minimum=1, optional=True)
    if dim_token not in (None, encoder.dim):
        raise args.fail("dim_token", f"is {dim_token}; blt-decode needs null or dim_local_encoder ({encoder.dim})")
    if global_.dim == decoder.dim:
        # the original decoder then has no patch_embedding_projection; ours always has one
        raise args.fail("dim_global", f"equals dim_local_decoder ({decoder.dim}); blt-decode needs a decoder patch projection")
    if encoder.n_layers < 1:
        raise args.fail("n_layers_local_encoder", "must be >= 1: the patch cross-attention runs after the last encoder layer")
    cross_heads = args.int("cross_attn_nheads", minimum=1)

    patcher, key = patching.reader, patching.key
    mode = patcher.raw(key("mode"), "entropy")
    if mode != "entropy":
        raise patcher.fail(key("mode"), f"is {mode!r}; blt-decode implements entropy patching only")
    patcher.require(key("monotonicity"), False, False)
    patcher.require(key("threshold_add"), None, None)
    if entropy is None:
        raise CheckpointError(f"{patcher.source}: entropy patching needs the entropy model")
    return build_config(
        args.source,
        encoder=encoder, global_=global_, decoder=decoder, entropy_model=entropy,
        cross_attn_k=args.int("cross_attn_k", minimum=1),
        cross_attn_nheads=None if cross_heads == encoder.n_heads else cross_heads,
        cross_attn_all_layers_decoder=args.bool("cross_attn_all_layers_decoder", False),
        encoder_hash_byte_group_size=_hash_sizes(args),
        encoder_hash_byte_group_vocab=args.int("encoder_hash_byte_group_vocab", 30000, minimum=1),
        encoder_hash_byte_group_nb_functions=args.int("encoder_hash_byte_group_nb_functions", 3, minimum=0),
        patching_mode="entropy",
        patching_threshold=patcher.float(key("threshold"), DEFAULT_THRESHOLD),
        max_patch_length=patcher.int(key("max_patch_length"), None, minimum=1, optional=True),
        max_seqlen=args.int("max_encoder_seq_length", None, minimum=1, optional=True) or args.int("max_seqlen", 1024, minimum=1),
    )


class PatchingFields:
    """Where a file keeps the patcher settings: PatcherArgs names (``data.patcher_args``) or the
    ByteLatentTransformerArgs names (``patching_threshold`` ...) when a file has no patcher_args."""

    PATCHER_ARGS = {"mode": "patching_mode", "threshold": "threshold", "max_patch_length": "max_patch_length",
                    "monotonicity": "monotonicity", "threshold_add": "threshold_add"}
    BLT_ARGS = {"mode": "patching_mode", "threshold": "patching_threshold", "max_patch_length": "max_patch_length",
                "monotonicity": "monotonicity", "threshold_add": "patching_threshold_add"}

    def __init__(self, reader: FieldReader, keys: dict[str, str]):
        self.reader, self.keys = reader, keys

    @classmethod
    def find(cls, params: dict[str, Any] | None, source: str, fallback: FieldReader) -> "PatchingFields":
        reader = FieldReader(params or {}, source)
        # present but malformed is an error, not a silent fall back to other settings
        if reader.has("data"):
            data = reader.sub("data")
            if data.has("patcher_args"):
                return cls(data.sub("patcher_args"), cls.PATCHER_ARGS)
        return cls(fallback, cls.BLT_ARGS)

    def key(self, name: str) -> str:
        return self.keys[name]


# -- loading ------------------------------------------------------------------------------------------
def _entropy_files(path: Path) -> tuple[Path, Path]:
    return path / ENTROPY_DIR / ENTROPY_PARAMS_FILE, path / ENTROPY_DIR / ENTROPY_WEIGHTS_FILE


def _read_entropy(path: Path) -> tuple[dict[str, Any], TransformerConfig, Path]:
    params_path, weights_path = _entropy_files(path)
    if not params_path.is_file() or not weights_path.is_file():
        raise CheckpointError(
            f"{path}: entropy patching needs the entropy model: looked for {params_path} and {weights_path}"
        )
    params = read_json(params_path)
    return params, entropy_config(FieldReader(params, str(params_path))), weights_path


def _load(config: BLTConfig, main: dict[str, torch.Tensor], main_source: str, entropy_weights: Path,
          dtype: torch.dtype | None, device: str | torch.device | None) -> BLTModel:
    shapes = expected_shapes(config)
    check_tensors({k: v for k, v in shapes.items() if not k.startswith(ENTROPY_PREFIX)}, main, main_source)
    entropy = state_dict_from_pth(read_torch_weights(entropy_weights), entropy_weights)
    check_tensors({k[len(ENTROPY_PREFIX):]: v for k, v in shapes.items() if k.startswith(ENTROPY_PREFIX)},
                  entropy, str(entropy_weights))
    tensors = {**main, **{ENTROPY_PREFIX + k: v for k, v in entropy.items()}}
    return build_model(config, tensors, main_source, dtype=dtype, device=device)


def load_original(path: Path, *, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> BLTModel:
    """The released layout: config.json {"args"} + model.safetensors + entropy_model/."""
    config_path = path / CONFIG_FILE
    payload = read_json(config_path)
    args = FieldReader(payload, str(config_path)).sub("args")
    params, entropy, entropy_weights = _read_entropy(path)
    # transformers' conversion script takes the patcher settings from entropy_model/params.json
    patching = PatchingFields.find(params, str(_entropy_files(path)[0]), fallback=args)
    config = config_from_original(args, patching, entropy)
    main = read_safetensors(path / WEIGHTS_FILE)
    return _load(config, main, str(path / WEIGHTS_FILE), entropy_weights, dtype, device)


def load_original_training(path: Path, *, dtype: torch.dtype | None = None,
                           device: str | torch.device | None = None) -> BLTModel:
    """The training-checkpoint layout: params.json (TrainArgs) + consolidated.pth {"model": ...}."""
    params_path = path / TRAIN_PARAMS_FILE
    params = read_json(params_path)
    if params.get("train_entropy_model"):
        raise CheckpointError(f"{params_path}: this is a checkpoint of an entropy model, not of a BLT")
    args = FieldReader(params, str(params_path)).sub("model")
    _, entropy, entropy_weights = _read_entropy(path)
    # the original generation code patches with the training run's data.patcher_args
    patching = PatchingFields.find(params, str(params_path), fallback=args)
    config = config_from_original(args, patching, entropy)
    weights_path = path / TRAIN_WEIGHTS_FILE
    main = state_dict_from_pth(read_torch_weights(weights_path), weights_path)
    return _load(config, main, str(weights_path), entropy_weights, dtype, device)


# -- writing ------------------------------------------------------------------------------------------
def _unsupported(problem: str) -> ConfigError:
    return ConfigError(f"cannot write this model in the original layout: {problem}")


def _multiple_of(widths: dict[str, tuple[int, int]]) -> int:
    """One ``multiple_of`` that reproduces every stack's FFN width (``name -> (dim, ffn_dim)``) with the
    original formula, preferring the code's default 256."""
    g = 0
    for _, width in widths.values():
        g = math.gcd(g, width)
    candidates = [256] + sorted((d for d in range(1, g + 1) if g % d == 0), reverse=True)
    for m in candidates:
        if all(ffn_dim(dim, m, None) == width for dim, width in widths.values()):
            return m
    detail = ", ".join(f"{k}: dim {d} ffn {w}" for k, (d, w) in widths.items())
    raise _unsupported(f"no single multiple_of gives these FFN widths with the original formula ({detail})")


def _same(field: str, values: dict[str, Any]) -> Any:
    if len(set(values.values())) != 1:
        raise _unsupported(f"the original args have one {field} for these stacks, the model has {values}")
    return next(iter(values.values()))


def config_to_original(config: BLTConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(``args`` for config.json, the entropy model's params.json) for ``config``."""
    enc, dec, glob, ent = config.encoder, config.decoder, config.global_, config.entropy_model
    if config.patching_mode != "entropy" or ent is None:
        raise _unsupported("the original static patching differs from blt-decode's; only entropy patching converts")
    if glob.sliding_window is not None:
        raise _unsupported(f"the original global model is fully causal (this one has window {glob.sliding_window})")
    if glob.dim == dec.dim:
        raise _unsupported("dim_global equal to the decoder dim leaves the original decoder without a patch projection")
    for field, value, fixed in (("sliding_window", ent.sliding_window, ENTROPY_LOADER_WINDOW),
                                ("rope_theta", ent.rope_theta, ENTROPY_LOADER_THETA),
                                ("norm_eps", ent.norm_eps, ENTROPY_LOADER_NORM_EPS)):
        if value != fixed:
            raise _unsupported(f"the original entropy loader fixes {field}={fixed}; this entropy model has {value}")
    theta = _same("rope_theta", {"encoder": enc.rope_theta, "decoder": dec.rope_theta, "global": glob.rope_theta})
    eps = _same("norm_eps", {"encoder": enc.norm_eps, "decoder": dec.norm_eps, "global": glob.norm_eps})
    window = _same("local_attention_window_len", {"encoder": enc.sliding_window, "decoder": dec.sliding_window})
    local_kv = _same("n_kv_heads", {"encoder": enc.n_kv_heads, "decoder": dec.n_kv_heads})
    if local_kv is not None and (enc.n_heads % local_kv or dec.n_heads % local_kv):
        raise _unsupported(f"n_kv_heads {local_kv} must divide both local models' heads")
    multiple_of = _multiple_of({"encoder": (enc.dim, enc.ffn_dim), "decoder": (dec.dim, dec.ffn_dim),
                                "global": (glob.dim, glob.ffn_dim)})
    entropy_multiple_of = _multiple_of({"entropy model": (ent.dim, ent.ffn_dim)})
    args = {
        "vocab_size": config.vocab_size,
        "dim": glob.dim, "n_layers": glob.n_layers, "n_heads": glob.n_heads,
        "dim_global": glob.dim, "dim_local_encoder": enc.dim, "dim_local_decoder": dec.dim,
        "n_layers_global": glob.n_layers, "n_layers_local_encoder": enc.n_layers, "n_layers_local_decoder": dec.n_layers,
        "n_heads_global": glob.n_heads, "n_heads_local_encoder": enc.n_heads, "n_heads_local_decoder": dec.n_heads,
        "n_kv_heads": local_kv, "n_kv_heads_global": glob.n_kv_heads, "head_dim": None,
        "multiple_of": multiple_of, "ffn_dim_multiplier": 1.0, "norm_eps": eps, "rope_theta": theta,
        "max_seqlen": config.max_seqlen, "max_encoder_seq_length": config.max_seqlen,
        "local_attention_window_len": window,
        "use_local_encoder_transformer": True, "dim_token": None, "use_rope": True,
        "cross_attn_encoder": True, "cross_attn_decoder": True, "cross_attn_init_by_pooling": True,
        "cross_attn_k": config.cross_attn_k, "cross_attn_nheads": config.cross_heads,
        "cross_attn_all_layers_encoder": False, "cross_attn_all_layers_decoder": config.cross_attn_all_layers_decoder,
        "cross_attn_window_encoder": None, "cross_attn_window_decoder": None,
        "downsampling_by_pooling": "max", "share_encoder_decoder_emb": True,
        "encoder_hash_byte_group_size": list(config.encoder_hash_byte_group_size),
        "encoder_hash_byte_group_vocab": config.encoder_hash_byte_group_vocab,
        "encoder_hash_byte_group_nb_functions": config.encoder_hash_byte_group_nb_functions,
        "encoder_enable_byte_ngrams": False, "encoder_ngram_to_size_str": None, "pm_size": 0,
        "patch_in_forward": False, "patching_mode": "entropy", "patching_threshold": config.patching_threshold,
        "max_patch_length": config.max_patch_length, "monotonicity": False,
        "norm_type": "rmsnorm", "non_linearity": "swiglu", "weight_tying": False,
        "tie_local_encoder_decoder": False, "attn_bias_type": "local_block_causal",
    }
    patcher_args = {
        "patching_mode": "entropy", "threshold": config.patching_threshold, "threshold_add": None,
        "max_patch_length": config.max_patch_length, "monotonicity": False, "realtime_patching": True,
        "patch_size": 4.5,
    }
    entropy_params = {
        "entropy_model": {
            "dim": ent.dim, "n_layers": ent.n_layers, "n_heads": ent.n_heads, "n_kv_heads": ent.n_kv_heads,
            "head_dim": None, "vocab_size": config.vocab_size, "max_seqlen": config.max_seqlen,
            "multiple_of": entropy_multiple_of, "ffn_dim_multiplier": None,
            # what the original loader uses anyway (checked above)
            "sliding_window": ent.sliding_window, "rope_theta": ent.rope_theta, "norm_eps": ent.norm_eps,
            "attn_bias_type": "local_block_causal",
        },
        "data": {"patcher_args": patcher_args},
    }
    return args, entropy_params


def save_original(model: BLTModel, path: Path, *, layout: str = "released") -> Path:
    """Write ``model`` in the released layout (default) or as a training checkpoint (``layout="training"``)."""
    if layout not in ("released", "training"):
        raise ValueError(f"layout must be 'released' or 'training', got {layout!r}")
    args, entropy_params = config_to_original(model.config)  # fails before anything is written
    tensors = cpu_state_dict(model)
    main = {k: v for k, v in tensors.items() if not k.startswith(ENTROPY_PREFIX)}
    entropy = {k[len(ENTROPY_PREFIX):]: v for k, v in tensors.items() if k.startswith(ENTROPY_PREFIX)}
    path.mkdir(parents=True, exist_ok=True)
    if layout == "released":
        (path / CONFIG_FILE).write_text(json.dumps({"args": args}, indent=2) + "\n")
        save_file(main, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    else:
        params = {"model": args, "data": entropy_params["data"], "entropy_model": entropy_params["entropy_model"],
                  "train_entropy_model": False}
        (path / TRAIN_PARAMS_FILE).write_text(json.dumps(params, indent=2) + "\n")
        torch.save({"model": main}, path / TRAIN_WEIGHTS_FILE)
    (path / ENTROPY_DIR).mkdir(exist_ok=True)
    (path / ENTROPY_DIR / ENTROPY_PARAMS_FILE).write_text(json.dumps(entropy_params, indent=2) + "\n")
    torch.save({"model": entropy}, path / ENTROPY_DIR / ENTROPY_WEIGHTS_FILE)
    return path
