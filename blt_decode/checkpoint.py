"""The native checkpoint format: ``config.json`` (the :class:`BLTConfig`) + ``model.safetensors``.

Loading checks every tensor against the configuration and names what is wrong; nothing is silently left
randomly initialised (the checks are shared with the other formats in :mod:`blt_decode.formats`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from blt_decode.config import BLTConfig
from blt_decode.errors import CheckpointError, ConfigError
from blt_decode.model import BLTModel

FORMAT_NAME = "blt-decode"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def is_native_checkpoint(path: Path) -> bool:
    config = path / CONFIG_FILE
    if not (config.is_file() and (path / WEIGHTS_FILE).is_file()):
        return False
    try:
        return json.loads(config.read_text()).get("format") == FORMAT_NAME
    except (json.JSONDecodeError, AttributeError):
        return False


def save_model(model: BLTModel, path: str | Path, *, metadata: dict | None = None) -> Path:
    """Write ``model`` to the directory ``path`` in the native format."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "config": model.config.to_dict()}
    if metadata:
        payload["metadata"] = metadata
    (path / CONFIG_FILE).write_text(json.dumps(payload, indent=2) + "\n")
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, str(path / WEIGHTS_FILE))
    return path


def read_config(path: Path) -> BLTConfig:
    try:
        payload = json.loads((path / CONFIG_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path / CONFIG_FILE} is not valid JSON: {exc}") from None
    if payload.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path / CONFIG_FILE}: unsupported format version {payload.get('version')!r}")
    try:
        return BLTConfig.from_dict(payload["config"])
    except KeyError:
        raise CheckpointError(f"{path / CONFIG_FILE} has no 'config' entry") from None
    except ConfigError as exc:
        raise CheckpointError(f"{path / CONFIG_FILE}: {exc}") from None


def load_native(path: str | Path, *, dtype: torch.dtype | None = None,
                device: str | torch.device | None = None) -> BLTModel:
    """Load a native checkpoint; every tensor is checked by name and shape (see formats._common)."""
    # imported here: blt_decode.formats imports this module to load native checkpoints
    from blt_decode.formats._common import build_model, read_safetensors

    path = Path(path)
    config = read_config(path)
    weights = path / WEIGHTS_FILE
    return build_model(config, read_safetensors(weights), str(weights), dtype=dtype, device=device)
