"""The native checkpoint format: ``config.json`` (the :class:`BLTConfig`) + ``model.safetensors``.

Loading checks every tensor against the configuration and names what is wrong; nothing is silently left
randomly initialised (the checks are shared with the other formats in :mod:`blt_decode.checkpoints.formats`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors.torch import save_file

from blt_decode.errors import CheckpointError, ConfigError
from blt_decode.model.blt import BLTModel
from blt_decode.model.config import BLTConfig

FORMAT_NAME = "blt-decode"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def is_native_checkpoint(path: Path) -> bool:
    """Does ``path`` hold a native checkpoint? A predicate: a config.json that cannot be read or parsed
    (not UTF-8, not JSON, not an object) answers False; :func:`load_native` says what is wrong with it."""
    # imported here: blt_decode.checkpoints.formats imports this module to load native checkpoints
    from blt_decode.checkpoints._common import read_json

    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        return False
    try:
        return read_json(path / CONFIG_FILE).get("format") == FORMAT_NAME
    except CheckpointError:
        return False


def shareable(metadata: Any) -> Any:
    """``metadata`` with every absolute local path (a string starting with ``/`` or ``~``) cut to its last
    component: a checkpoint is meant to be shared, and the directories of the machine that wrote it (a home
    directory, a user name, a temporary directory) are no business of those it is shared with. Relative
    paths (``runs/blt/final``, ``corpora/code``) are kept: they say how the run was made."""
    if isinstance(metadata, dict):
        return {key: shareable(value) for key, value in metadata.items()}
    if isinstance(metadata, (list, tuple)):
        return [shareable(value) for value in metadata]
    if isinstance(metadata, str) and metadata.startswith(("/", "~")):
        return PurePosixPath(metadata).name or metadata[:1]
    return metadata


def source_digest(path: Path) -> str:
    """sha256 of a checkpoint directory's files (their names and bytes, in name order, subdirectories
    included): what ``convert`` records of its source instead of the source's local path."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with file.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def save_model(model: BLTModel, path: str | Path, *, metadata: dict | None = None) -> Path:
    """Write ``model`` to the directory ``path`` in the native format (``metadata`` as :func:`shareable`
    makes it: no absolute local path)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "config": model.config.to_dict()}
    if metadata:
        payload["metadata"] = shareable(metadata)
    (path / CONFIG_FILE).write_text(json.dumps(payload, indent=2) + "\n")
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, str(path / WEIGHTS_FILE))
    return path


def read_config(path: Path) -> BLTConfig:
    """The :class:`BLTConfig` of the native checkpoint directory ``path``; any problem with config.json is a
    CheckpointError naming the file and the field."""
    from blt_decode.checkpoints._common import expected_shapes, read_json

    config_path = path / CONFIG_FILE
    payload = read_json(config_path)
    if payload.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{config_path}: unsupported format version {payload.get('version')!r} "
                              f"(this blt-decode reads version {FORMAT_VERSION})")
    if "config" not in payload:
        raise CheckpointError(f"{config_path} has no 'config' entry")
    if not isinstance(payload["config"], dict):
        raise CheckpointError(f"{config_path}: 'config' must be an object, got {type(payload['config']).__name__}")
    try:
        config = BLTConfig.from_dict(payload["config"])
    except ConfigError as exc:
        raise CheckpointError(f"{config_path}: {exc}") from None
    expected_shapes(config, str(config_path))  # sizes torch cannot represent are the config's fault
    return config


def load_native(path: str | Path, *, dtype: torch.dtype | None = None,
                device: str | torch.device | None = None) -> BLTModel:
    """Load a native checkpoint; every tensor is checked by name and shape (see checkpoints._common)."""
    # imported here: blt_decode.checkpoints.formats imports this module to load native checkpoints
    from blt_decode.checkpoints._common import build_model, read_safetensors

    path = Path(path)
    config = read_config(path)
    weights = path / WEIGHTS_FILE
    return build_model(config, read_safetensors(weights), str(weights), dtype=dtype, device=device)
