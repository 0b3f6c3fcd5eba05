"""Model configurations (attrs, frozen). Field names follow the public BLT code where it has one."""

from __future__ import annotations

import math
from typing import Any, Callable, Literal, Mapping

import attrs

from blt_decode.checks import Validators, is_int, show, to_float, to_int
from blt_decode.errors import ConfigError
from blt_decode.model.tokenizer import VOCAB_SIZE


def ffn_dim_for(dim: int, multiple_of: int = 256) -> int:
    """Feed-forward width of the public code: ``multiple_of * ceil(int(8 * dim / 3) / multiple_of)``."""
    return multiple_of * math.ceil(int(8 * dim / 3) / multiple_of)


# -- field checks ------------------------------------------------------------------------------------
# Every field is checked at construction, so a config read from a file cannot carry a wrong type into the
# model; a refused value is one ConfigError line naming the field, what it allows and what was given.
def _int_tuple(value: Any) -> Any:
    """Converter: a list or tuple to a tuple of converted ints; anything else is left for the validator."""
    if isinstance(value, (list, tuple)):
        return tuple(to_int(v) for v in value)
    return value


#: upper bounds of the sizes a config may ask for: far beyond any released BLT (BLT-7B: dim 4096, 32
#: global layers; Hugging Face's default max_position_embeddings is 24576), low enough that a typo
#: (n_layers 100000, max_seqlen 10**12) is one line now instead of minutes of building or an allocator error
MAX_DIM = 65536
MAX_LAYERS = 1024
MAX_HEADS = 1024
MAX_FFN_DIM = 262144
MAX_SEQLEN = 1 << 20
MAX_HASH_VOCAB = 1 << 24
MAX_SMALL = 64  #: cross-attention slots, hash functions, hash n-gram sizes and their count


#: the model configs' family of checks (blt_decode.checks): "dim must be ..., got ..."
CHECKS = Validators(ConfigError, optional=" or None (null)", booleans="True or False (true or false in JSON)")


def _group_sizes(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """Validator: a tuple of at most MAX_SMALL ints in 1..MAX_SMALL (the converter has made a list a tuple)."""
    if not isinstance(value, tuple) or len(value) > MAX_SMALL or not all(is_int(n) and 1 <= n <= MAX_SMALL for n in value):
        shown = list(value) if isinstance(value, tuple) else value  # as the JSON file spells it
        raise ConfigError(f"{attribute.name} must be a list of integers in 1..{MAX_SMALL} (at most {MAX_SMALL} of them), got {show(shown)}")


def _stack(*, optional: bool = False) -> Callable[[Any, attrs.Attribute, Any], None]:
    """Validator: a :class:`TransformerConfig` (``None`` too when ``optional``)."""

    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value is None and optional:
            return
        if not isinstance(value, TransformerConfig):
            allowed = "a TransformerConfig" + (" or None" if optional else "")
            raise ConfigError(f"{attribute.name} must be {allowed}, got {show(value)}")

    return check


@attrs.frozen
class TransformerConfig:
    """One stack of Llama-style blocks (the encoder, global model, decoder or entropy model)."""

    dim: int = attrs.field(converter=to_int, validator=CHECKS.integer(1, MAX_DIM))
    n_layers: int = attrs.field(converter=to_int, validator=CHECKS.integer(0, MAX_LAYERS))
    n_heads: int = attrs.field(converter=to_int, validator=CHECKS.integer(1, MAX_HEADS))
    ffn_dim: int = attrs.field(converter=to_int, validator=CHECKS.integer(1, MAX_FFN_DIM))
    n_kv_heads: int | None = attrs.field(default=None, converter=to_int, validator=CHECKS.integer(1, MAX_HEADS, optional=True))
    #: sliding attention window in positions (None = full causal attention)
    sliding_window: int | None = attrs.field(default=None, converter=to_int, validator=CHECKS.integer(1, MAX_SEQLEN, optional=True))
    rope_theta: float = attrs.field(default=10000.0, converter=to_float, validator=CHECKS.number(0.0, low_open=True))
    norm_eps: float = attrs.field(default=1e-5, converter=to_float, validator=CHECKS.number(0.0, low_open=True))

    def __attrs_post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ConfigError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.n_heads % self.kv_heads:
            raise ConfigError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads


PatchingMode = Literal["entropy", "static"]


@attrs.frozen
class BLTConfig:
    """A whole BLT: hash embeddings, local encoder, global transformer, local decoder and patcher."""

    encoder: TransformerConfig = attrs.field(validator=_stack())
    global_: TransformerConfig = attrs.field(validator=_stack())
    decoder: TransformerConfig = attrs.field(validator=_stack())
    #: the entropy model that drives patching (None for static patching)
    entropy_model: TransformerConfig | None = attrs.field(default=None, validator=_stack(optional=True))
    vocab_size: int = attrs.field(default=VOCAB_SIZE, converter=to_int, validator=CHECKS.integer(1))
    #: cross-attention slots per patch ("k" in the paper; 2 in the released models)
    cross_attn_k: int = attrs.field(default=2, converter=to_int, validator=CHECKS.integer(1, MAX_SMALL))
    cross_attn_nheads: int | None = attrs.field(default=None, converter=to_int, validator=CHECKS.integer(1, MAX_HEADS, optional=True))
    #: decoder cross-attention before every layer (released) or only the first
    cross_attn_all_layers_decoder: bool = attrs.field(default=True, validator=CHECKS.flag())
    encoder_hash_byte_group_size: tuple[int, ...] = attrs.field(
        default=(3, 4, 5, 6, 7, 8), converter=_int_tuple, validator=_group_sizes)
    encoder_hash_byte_group_vocab: int = attrs.field(default=500002, converter=to_int, validator=CHECKS.integer(1, MAX_HASH_VOCAB))
    encoder_hash_byte_group_nb_functions: int = attrs.field(default=1, converter=to_int, validator=CHECKS.integer(0, MAX_SMALL))
    patching_mode: PatchingMode = attrs.field(default="entropy", validator=CHECKS.choice(("entropy", "static")))
    #: entropy threshold θ: byte t+1 starts a patch when H(t) > θ
    patching_threshold: float = attrs.field(default=1.335442066192627, converter=to_float, validator=CHECKS.number())
    #: forced boundary after this many bytes in a patch (None = no limit); the patch size in static mode
    max_patch_length: int | None = attrs.field(default=None, converter=to_int, validator=CHECKS.integer(1, MAX_SEQLEN, optional=True))
    #: the longest sequence (BOS + prompt + generated bytes) the model accepts
    max_seqlen: int = attrs.field(default=4096, converter=to_int, validator=CHECKS.integer(1, MAX_SEQLEN))

    def __attrs_post_init__(self) -> None:
        if self.patching_mode == "entropy" and self.entropy_model is None:
            raise ConfigError("patching_mode='entropy' needs an entropy_model config")
        if self.patching_mode == "static" and self.max_patch_length is None:
            raise ConfigError("patching_mode='static' needs max_patch_length (the fixed patch size)")
        if self.encoder.dim % self.cross_heads or self.decoder.dim % self.cross_heads:
            raise ConfigError(f"cross_attn_nheads {self.cross_heads} must divide the encoder and decoder dims")
        if self.encoder.dim != self.decoder.dim:
            raise ConfigError(
                f"the decoder reads the encoder's byte states: encoder dim {self.encoder.dim} "
                f"must equal decoder dim {self.decoder.dim}"
            )
        if self.vocab_size != VOCAB_SIZE:
            raise ConfigError(f"vocab_size must be {VOCAB_SIZE} (256 bytes + 4 special ids), got {self.vocab_size}")

    @property
    def cross_heads(self) -> int:
        """Heads of the encoder/decoder cross-attention (the public code's ``cross_attn_nheads``)."""
        return self.cross_attn_nheads or self.encoder.n_heads

    @property
    def n_hash_tables(self) -> int:
        return self.encoder_hash_byte_group_nb_functions * len(self.encoder_hash_byte_group_size)

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self, recurse=True)

    @classmethod
    def from_dict(cls, data: Any) -> "BLTConfig":
        """The config from :meth:`to_dict`'s form (as read from a native ``config.json``).

        Every problem is a :class:`ConfigError` naming the field: unknown or missing fields, a sub-config
        that is not an object, and any value the field checks refuse (prefixed with the sub-config's name).
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"the config must be an object, got {_kind(data)}")
        data = dict(data)
        _check_names(cls, data, "")
        for key in _STACK_FIELDS:
            sub = data.get(key)
            if isinstance(sub, TransformerConfig) or (key == "entropy_model" and sub is None):
                continue  # already built; None: static patching
            if not isinstance(sub, Mapping):
                if key not in data:
                    continue  # reported as a missing field below
                allowed = " or null (static patching)" if key == "entropy_model" else ""
                raise ConfigError(f"{key} must be an object with the TransformerConfig fields{allowed}, got {_kind(sub)}")
            _check_names(TransformerConfig, sub, f"{key}.")
            try:
                data[key] = TransformerConfig(**sub)
            except ConfigError as exc:
                raise ConfigError(f"{key}: {exc}") from None
        return cls(**data)


_STACK_FIELDS = ("encoder", "global_", "decoder", "entropy_model")


def _kind(value: Any) -> str:
    """A short description of a wrong value: its JSON spelling for scalars, the type for containers."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    return f"a {type(value).__name__}"


def _check_names(cls: type, data: Mapping[str, Any], prefix: str) -> None:
    """Fail on field names ``cls`` does not have and on required ones ``data`` lacks (instead of
    the TypeError of ``cls(**data)``)."""
    fields = attrs.fields(cls)
    unknown = sorted(set(data) - {f.name for f in fields})
    if unknown:
        where = f" in {prefix.rstrip('.')}" if prefix else ""
        raise ConfigError(f"unknown config field(s){where}: {', '.join(map(str, unknown))}")
    missing = [f.name for f in fields if f.default is attrs.NOTHING and f.name not in data]
    if missing:
        raise ConfigError(f"missing config field(s): {', '.join(prefix + m for m in missing)}")


def stack_config(dim: int, n_layers: int, n_heads: int, window: int | None, multiple_of: int = 32) -> TransformerConfig:
    """A stack with the public code's feed-forward width rule (the presets of :mod:`blt_decode.model.presets` use it)."""
    return TransformerConfig(
        dim=dim, n_layers=n_layers, n_heads=n_heads, ffn_dim=ffn_dim_for(dim, multiple_of), sliding_window=window
    )
