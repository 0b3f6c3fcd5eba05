"""The native checkpoint format: ``config.json`` (the :class:`BLTConfig`) + ``model.safetensors``.

Loading checks every tensor against the configuration and names what is wrong; nothing is silently left
randomly initialised.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

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


def load_state_dict_strict(model: BLTModel, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``tensors`` into ``model``, failing with the name of any missing, unexpected or misshapen tensor."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise CheckpointError(f"{source}: missing tensor {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor {unexpected[0]!r}" + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    for name, want in expected.items():
        got = tensors[name]
        if tuple(got.shape) != tuple(want.shape):
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {tuple(got.shape)}, the config expects {tuple(want.shape)}"
            )
        if not torch.isfinite(got.float()).all():
            raise CheckpointError(f"{source}: tensor {name!r} holds NaN or infinite values")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()}, strict=True)


def load_native(path: str | Path) -> BLTModel:
    path = Path(path)
    config = read_config(path)
    weights = path / WEIGHTS_FILE
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights} is corrupt or truncated: {exc}") from None
    model = BLTModel(config)
    load_state_dict_strict(model, tensors, str(weights))
    return model.eval()
