"""Resolving a model spec: a checkpoint directory, the model shipped in the package, or a seeded random
model; and the device and dtype checks every entry point shares."""

from __future__ import annotations

import copy
from pathlib import Path

import attrs
import torch

from blt_decode.checkpoints.formats import load_checkpoint
from blt_decode.checkpoints.native import load_native
from blt_decode.checks import MAX_SEED, show
from blt_decode.errors import InvalidRequestError, UnknownModelError
from blt_decode.model import tokenizer
from blt_decode.model.blt import BLTModel, init_weights
from blt_decode.model.config import BLTConfig
from blt_decode.model.presets import BLT_PRESETS

DEFAULT_MODEL_DIR = Path(__file__).parents[1] / "default_model"
#: the torch device types a model can decode and train on here (others: "meta" holds no data, "mps" and
#: "xpu" are untested; each would fail later with an error from deep inside torch)
DEVICE_TYPES = ("cpu", "cuda")

# A fixed text used to set the entropy threshold of random models (see random_model)
_CALIBRATION_TEXT = (
    b"def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n"
    b"Shall I compare thee to a summer's day? Thou art more lovely and more temperate.\n"
    b"import os, sys\nfor line in sys.stdin:\n    print(line.strip().upper())\n"
)


def random_model(preset: str | BLTConfig = "tiny", seed: int = 0, *, mean_patch_length: float | None = 4.5,
                 dtype: torch.dtype | None = None) -> BLTModel:
    """A seeded random model. For entropy patching, the threshold is set so that patches on a fixed
    calibration text average ``mean_patch_length`` bytes (random weights give no meaningful absolute
    entropies; the released models average about 4.5 bytes per patch)."""
    config = random_presets()[preset] if isinstance(preset, str) else preset
    if dtype in (torch.bfloat16, torch.float16):
        # allocated in its dtype (a BLT-1B shape would need 18 GB in float32 first); same weights as
        # a float32 model converted, see init_weights
        with torch.device("meta"):
            model = BLTModel(config).to(dtype)
        model = init_weights(model.to_empty(device="cpu"), torch.Generator().manual_seed(seed))
    else:
        model = init_weights(BLTModel(config), torch.Generator().manual_seed(seed))
        if dtype is not None:
            model = model.to(dtype)
    if config.patching_mode == "entropy" and mean_patch_length is not None:
        ids = torch.tensor([tokenizer.encode(_CALIBRATION_TEXT)])
        with torch.no_grad():
            ent = model.entropies(ids)[0, 1:].double()
        theta = float(torch.quantile(ent, 1.0 - 1.0 / mean_patch_length))
        model = with_config(model, attrs.evolve(config, patching_threshold=theta))
    return model.eval()


def random_presets() -> dict[str, BLTConfig]:
    """The shapes ``random:PRESET`` knows: every preset of :data:`blt_decode.model.presets.BLT_PRESETS`
    (tiny, small, blt-10m ... blt-1b, the released BLT-1B shape) but ``default``, which names the shipped
    model, not a shape."""
    return {name: config for name, config in BLT_PRESETS.items() if name != "default"}


def with_config(model: BLTModel, config: BLTConfig) -> BLTModel:
    """The same weights under a config that changes only patching fields (threshold, max length)."""
    new = BLTModel(config).to(dtype=model.dtype, device=model.device)
    new.load_state_dict(model.state_dict())
    return new.eval()


def default_model_available() -> bool:
    """Is a trained default model shipped in this installation?"""
    return (DEFAULT_MODEL_DIR / "config.json").is_file()


def load_model(spec: str | Path | BLTModel, *, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> BLTModel:
    """A model from a spec: a checkpoint directory (native, Hugging Face or original layout, see
    :mod:`blt_decode.checkpoints.formats`), ``"default"`` (the model shipped in the package),
    ``"random:PRESET"`` or ``"random:PRESET:SEED"`` (presets: :func:`random_presets`), or a model (returned as is,
    moved to ``dtype``/``device`` if given; a model passed in is copied, never converted in place)."""
    dtype, device = _check_dtype(dtype), check_device(device)
    if isinstance(spec, BLTModel):
        model = spec
        if (dtype is not None and dtype != model.dtype) or (device is not None and device != model.device):
            model = copy.deepcopy(model)
    else:
        spec_str = str(spec)
        if spec_str.startswith("random:"):
            parts = spec_str.split(":")
            presets = random_presets()
            # the seed in ASCII digits (str.isdigit also takes '²', which int() refuses), at most MAX_SEED
            # (torch's manual_seed overflows beyond it), and short enough for int() (its digit limit)
            seed_text = parts[2] if len(parts) == 3 else "0"
            if len(parts) not in (2, 3) or parts[1] not in presets or not (seed_text.isascii() and seed_text.isdigit()) \
                    or len(seed_text) > len(str(MAX_SEED)) or int(seed_text) > MAX_SEED:
                raise UnknownModelError(
                    f"bad random model spec {show(spec_str)}: use random:PRESET or random:PRESET:SEED with PRESET in "
                    f"{sorted(presets)} and SEED an integer in 0..2**64-1"
                )
            model = random_model(parts[1], int(seed_text), dtype=dtype)
        elif spec_str == "default":
            # a shipped but unreadable model must say what is wrong with it, not that none is shipped
            if not (DEFAULT_MODEL_DIR / "config.json").is_file():
                raise UnknownModelError(
                    "no trained default model is shipped in this installation yet; use --model random:tiny "
                    "or a checkpoint directory"
                )
            model = load_native(DEFAULT_MODEL_DIR)
        else:
            path = Path(spec_str)
            if not path.exists():
                raise UnknownModelError(
                    f"model {spec_str!r} is neither a directory nor a known spec (default, random:tiny, random:small)"
                )
            # native, Hugging Face or original layout, recognised by the files present; an unrecognised
            # directory raises UnknownModelError listing the files looked for
            model = load_checkpoint(path, dtype=dtype, device=device)
    if dtype is not None or device is not None:
        model = model.to(dtype=dtype, device=device)
    return model.eval()


def _check_dtype(dtype: torch.dtype | None) -> torch.dtype | None:
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise InvalidRequestError(f"dtype must be a floating-point torch dtype (float32, bfloat16, float16, float64), got {dtype!r}")
    return dtype


def check_device(device: str | torch.device | None) -> torch.device | None:
    """The device, or one clear line: an unknown name, or CUDA asked for where torch has none."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidRequestError(f"device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1): {str(exc).splitlines()[0]}") from None
    if dev.type not in DEVICE_TYPES:
        raise InvalidRequestError(f"device {device!r} cannot run a model: use one of {', '.join(DEVICE_TYPES)} "
                                  f"(cuda:N for a GPU of several)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidRequestError(f"device {device!r} asked for, but torch sees no CUDA GPU (torch {torch.__version__})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InvalidRequestError(f"device {device!r} does not exist: torch sees {torch.cuda.device_count()} CUDA GPU(s)")
    return dev
