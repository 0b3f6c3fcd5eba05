"""Checkpoint formats: recognise a checkpoint directory by the files in it, load it, write it (layouts,
detection and the safety of loading: docs/checkpoints.md)."""

from __future__ import annotations

from pathlib import Path

import torch

from blt_decode.checkpoints import native
from blt_decode.checkpoints import hf, original
from blt_decode.checkpoints._common import read_json
from blt_decode.errors import CheckpointError, UnknownModelError
from blt_decode.model.blt import BLTModel

#: formats that :func:`save_checkpoint` writes (``original`` = the released layout)
WRITE_FORMATS = ("native", "hf", "original")

#: what detection looks for, in order (used in the error for an unrecognised directory)
LOOKED_FOR = (
    "config.json with \"format\": \"blt-decode\" + model.safetensors (native)",
    "config.json with \"model_type\": \"blt\" + model.safetensors or model.safetensors.index.json (Hugging Face)",
    "config.json with \"args\" + model.safetensors + entropy_model/ (original, as released)",
    "params.json + consolidated.pth (original training checkpoint)",
)


def detect_format(path: str | Path) -> str:
    """``"native"``, ``"hf"``, ``"original"`` or ``"original-train"`` for a checkpoint directory."""
    path = Path(path)
    if not path.is_dir():
        raise UnknownModelError(f"{path} is not a directory")
    config_path = path / native.CONFIG_FILE
    config = read_json(config_path) if config_path.is_file() else None
    if config is not None:
        if config.get("format") == native.FORMAT_NAME:
            if not (path / native.WEIGHTS_FILE).is_file():
                raise CheckpointError(f"{path}: native checkpoint without {native.WEIGHTS_FILE}")
            return "native"
        if hf.is_hf_checkpoint(path, config):
            return "hf"
        if "args" in config:
            if not (path / original.WEIGHTS_FILE).is_file():
                raise CheckpointError(f"{path}: original checkpoint without {original.WEIGHTS_FILE}")
            return "original"
    if (path / original.TRAIN_PARAMS_FILE).is_file() and (path / original.TRAIN_WEIGHTS_FILE).is_file():
        return "original-train"
    found = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
    raise UnknownModelError(
        f"{path} holds no checkpoint blt-decode recognises; looked for: " + "; ".join(LOOKED_FOR) + f". Found: {found}"
    )


def load_checkpoint(path: str | Path, *, dtype: torch.dtype | None = None,
                    device: str | torch.device | None = None) -> BLTModel:
    """Load the checkpoint directory ``path`` in whichever format it is. ``dtype`` defaults to float32."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "native":
        return native.load_native(path, dtype=dtype, device=device)
    if fmt == "hf":
        return hf.load_hf(path, dtype=dtype, device=device)
    if fmt == "original":
        return original.load_original(path, dtype=dtype, device=device)
    return original.load_original_training(path, dtype=dtype, device=device)


def save_checkpoint(model: BLTModel, path: str | Path, fmt: str) -> Path:
    """Write ``model`` to the directory ``path`` as ``fmt`` (one of :data:`WRITE_FORMATS`).

    A model the target format cannot express (for example a static-patching model in the Hugging Face
    layout) raises :class:`~blt_decode.errors.ConfigError` before anything is written.
    """
    path = Path(path)
    if fmt == "native":
        return native.save_model(model, path)
    if fmt == "hf":
        return hf.save_hf(model, path)
    if fmt == "original":
        return original.save_original(model, path)
    raise ValueError(f"unknown checkpoint format {fmt!r}; choose one of {', '.join(WRITE_FORMATS)}")


__all__ = ["LOOKED_FOR", "WRITE_FORMATS", "detect_format", "load_checkpoint", "save_checkpoint"]
