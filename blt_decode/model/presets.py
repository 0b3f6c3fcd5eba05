"""Model shapes by name, one table: ``blt-decode train --preset NAME`` (or ``--preset FILE.json``) and
``random:NAME`` models read the same presets.

BLT's proportions: in BLT-1B the global transformer holds about 90 % of the weights a decoding step
reads (Eq. 8 counts encoder, global model and decoder; embedding tables are lookups and not counted;
the public BLT-1B shape computes to 87.9 % here). The ``blt-*`` presets keep that share at every size
(:func:`global_share`); ``default`` is the shape of the shipped default model (77 %), kept so that its
documented training commands still reproduce it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import torch

from blt_decode.checks import loads_json
from blt_decode.errors import ConfigError, TrainingError
from blt_decode.model.config import BLTConfig, TransformerConfig, stack_config


#: The entropy model (the small byte LM that patches). ``tiny`` is for tests.
ENTROPY_PRESETS: dict[str, TransformerConfig] = {
    "default": stack_config(128, 2, 4, 512),
    "tiny": stack_config(32, 1, 2, 64),
}


def _blt(local: int, enc_layers: int, dec_layers: int, local_heads: int, glob: int, glob_layers: int,
         glob_heads: int, hash_vocab: int, *, window: int = 512, multiple_of: int = 32,
         entropy: TransformerConfig = ENTROPY_PRESETS["default"]) -> BLTConfig:
    return BLTConfig(
        encoder=stack_config(local, enc_layers, local_heads, window, multiple_of),
        global_=stack_config(glob, glob_layers, glob_heads, None, multiple_of),
        decoder=stack_config(local, dec_layers, local_heads, window, multiple_of),
        entropy_model=entropy,
        encoder_hash_byte_group_size=(3, 4, 5, 6, 7, 8),
        encoder_hash_byte_group_vocab=hash_vocab,
        max_seqlen=4096,
    )


BLT_PRESETS: dict[str, BLTConfig] = {
    #: the shipped default model's shape (global share 77 %)
    "default": _blt(128, 1, 2, 4, 256, 4, 4, 2053),
    #: the tests' shape, and ``random:tiny``'s (seconds to build and decode on any machine)
    "tiny": BLTConfig(
        encoder=stack_config(32, 1, 2, 64),
        global_=stack_config(64, 3, 4, None),
        decoder=stack_config(32, 2, 2, 64),
        entropy_model=ENTROPY_PRESETS["tiny"],
        encoder_hash_byte_group_size=(3, 4, 5),
        encoder_hash_byte_group_vocab=509,
        patching_threshold=5.0,
        max_seqlen=2048,
    ),
    #: ``random:small``: BLT-1B divided by 8 in width (encoder 1 layer, global 25 -> 8 layers, decoder 9 -> 3)
    "small": attrs.evolve(_blt(128, 1, 3, 4, 256, 8, 4, 4099, entropy=stack_config(96, 2, 4, 512)),
                          patching_threshold=5.0),
    # BLT's proportions: encoder 1 layer, decoder a few layers at the local width, a global model about
    # 3x wider holding ~90 % of the per-step weights (see global_share)
    "blt-10m": _blt(128, 1, 2, 4, 384, 6, 6, 2053),
    "blt-40m": _blt(256, 1, 3, 4, 768, 6, 12, 8191),
    "blt-150m": _blt(384, 1, 4, 6, 1024, 12, 16, 16381),
    # the released BLT-1B shape (encoder 1 x 1024, global 25 x 2048, decoder 9 x 1024, 16 heads, hash
    # n-grams 3..8 with 500002 buckets, entropy model 14 x 768); to be trained on GPUs
    "blt-1b": BLTConfig(
        encoder=stack_config(1024, 1, 16, 512, multiple_of=256),
        global_=stack_config(2048, 25, 16, None, multiple_of=256),
        decoder=stack_config(1024, 9, 16, 512, multiple_of=256),
        entropy_model=stack_config(768, 14, 12, 512, multiple_of=256),
        encoder_hash_byte_group_vocab=500002,
        max_seqlen=4096,
    ),
}
#: The baseline plain byte-level transformer, sized like the default BLT's non-embedding parameters.
BYTELM_PRESETS: dict[str, TransformerConfig] = {
    "default": stack_config(256, 5, 4, 512),
    "tiny": stack_config(32, 2, 2, 64),
}


def global_share(config: BLTConfig) -> float:
    """The global model's share of the weights one decoding step reads (encoder + global + decoder,
    embedding tables excluded, as in the paper's Eq. 8). Built on the meta device: no memory is used."""
    from blt_decode.model.blt import BLTModel

    with torch.device("meta"):
        counts = BLTModel(config).param_counts()
    return counts.global_ / (counts.encoder + counts.global_ + counts.decoder)


#: the largest --preset file read (a model config, or a checkpoint's config.json with its metadata: KiB)
MAX_PRESET_BYTES = 16 << 20


def _read_preset_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_PRESET_BYTES + 1)  # bounded: --preset /dev/zero is not read to the end
        if len(raw) > MAX_PRESET_BYTES:
            raise TrainingError(f"--preset {path}: larger than {MAX_PRESET_BYTES >> 20} MiB, not a model config")
        data = loads_json(raw)
    except (OSError, ValueError) as exc:
        raise TrainingError(f"--preset {path}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict):
        raise TrainingError(f"--preset {path}: expected a JSON object")
    # a native checkpoint's config.json ({"format": ..., "config": {...}}) serves as a preset too
    return data["config"] if isinstance(data.get("config"), dict) else data


def is_preset_file(preset: str) -> bool:
    """A ``--preset`` value naming a JSON file rather than a built-in preset."""
    return preset.endswith(".json")


def blt_preset(preset: str) -> BLTConfig:
    """The BLT config of a preset name (:data:`BLT_PRESETS`) or of a JSON file holding a
    :class:`BLTConfig` (as ``BLTConfig.to_dict()`` writes it, or a native checkpoint's config.json)."""
    if is_preset_file(preset):
        try:
            return BLTConfig.from_dict(_read_preset_file(Path(preset)))
        except ConfigError as exc:
            raise TrainingError(f"--preset {preset}: {exc}") from None
    if preset not in BLT_PRESETS:
        raise TrainingError(f"unknown BLT preset {preset!r}; choose from {', '.join(sorted(BLT_PRESETS))} or pass a .json file")
    return BLT_PRESETS[preset]


def stack_preset(kind: str, preset: str) -> TransformerConfig:
    """The stack config of an ``entropy`` or ``bytelm`` preset name, or of a JSON file holding a
    :class:`TransformerConfig`'s fields."""
    if is_preset_file(preset):
        data = _read_preset_file(Path(preset))
        try:
            return TransformerConfig(**data)
        except (TypeError, ConfigError) as exc:
            raise TrainingError(f"--preset {preset}: not a transformer config ({exc})") from None
    presets = ENTROPY_PRESETS if kind == "entropy" else BYTELM_PRESETS
    if preset not in presets:
        raise TrainingError(f"unknown {kind} preset {preset!r}; choose from {', '.join(sorted(presets))} or pass a .json file")
    return presets[preset]
