"""Pieces shared by the checkpoint formats: safe file readers, config field readers that name the field
and the file, strict tensor checks, and model construction without random initialisation.

Every reader turns a low-level failure (bad JSON, a truncated safetensors or ``.pth`` file, a pickle that
wants to run code) into a :class:`~blt_decode.errors.CheckpointError` that names the file.
"""

from __future__ import annotations

import json
import math
import pickle
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from blt_decode.checks import is_int, show
from blt_decode.errors import CheckpointError, ConfigError
from blt_decode.model.blt import BLTModel
from blt_decode.model.config import BLTConfig

ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)

_MISSING = object()


# -- files ------------------------------------------------------------------------------------------
#: the largest JSON file of a checkpoint read (config.json, a sharded checkpoint's index: KiB to a few MiB)
MAX_JSON_BYTES = 64 << 20


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; a missing, unreadable, non-UTF-8, truncated or non-object file is a
    CheckpointError naming the file.

    The bytes are decoded as UTF-8 whatever the locale (JSON files are UTF-8, RFC 8259 §8.1; the
    locale's default encoding would misread or reject them differently per machine).
    """
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_JSON_BYTES + 1)  # bounded: a config.json that is a device is not read to the end
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_JSON_BYTES:
        raise CheckpointError(f"{path} is larger than {MAX_JSON_BYTES >> 20} MiB: not a checkpoint's JSON file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(
            f"{path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); JSON files must be UTF-8"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON (truncated or corrupt?): {exc}") from None
    except (ValueError, RecursionError) as exc:
        # ValueError: an integer literal longer than Python's digit limit; RecursionError: absurd nesting
        raise CheckpointError(f"{path} is not valid JSON: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, on the CPU."""
    if not path.is_file():
        raise CheckpointError(f"missing weights file {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is corrupt or truncated: {exc}") from None


def read_torch_weights(path: Path) -> Any:
    """The object in a ``.pth`` file, loaded with ``weights_only=True``: tensors and plain containers only,
    so a file that asks to run pickled code is refused instead of executed."""
    if not path.is_file():
        raise CheckpointError(f"missing weights file {path}")
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols it did not write before refusing such a file; the refusal
            # below is the one line the user gets
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        message = str(exc)
        if "Weights only load failed" in message or "Unsupported global" in message:
            # weights_only refuses any global that is not a tensor type or a plain container; torch's own
            # first line advises weights_only=False, which would run the code: give the reason instead
            raise CheckpointError(
                f"{path} holds more than plain tensors (refusing to execute pickled code): {_refusal_reason(message)}"
            ) from None
        raise CheckpointError(f"{path} is corrupt or not a torch file: {_first_line(message)}") from None
    except Exception as exc:  # noqa: BLE001 - a file parser's failure on arbitrary bytes, reported against the file
        # torch's readers raise RuntimeError, EOFError, KeyError, ... on bytes that are not a torch file
        raise CheckpointError(f"{path} is corrupt or truncated: {_first_line(str(exc)) or type(exc).__name__}") from None


def _refusal_reason(message: str) -> str:
    """What torch's weights-only unpickler refused (an unsupported global or opcode), without its advice."""
    for line in message.splitlines():
        line = line.strip().removeprefix("WeightsUnpickler error:").strip()
        if line and ("GLOBAL" in line or line.startswith("Unsupported")):
            return line
    return "the weights-only unpickler refused it"


def _first_line(message: str) -> str:
    """torch appends multi-line explanations and C++ stack traces; the first line says what failed."""
    lines = message.strip().splitlines()
    return lines[0] if lines else ""


def state_dict_from_pth(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside a consolidated ``.pth`` object: ``{"model": state_dict}`` as the original code
    writes it (a bare state dict is accepted too)."""
    if isinstance(obj, Mapping) and "model" in obj:
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no state dict: expected {{'model': {{name: tensor}}}}")
    bad = [k for k in obj if not isinstance(k, str)]
    if bad:
        raise CheckpointError(f"{path}: tensor names must be strings, found {bad[0]!r}")
    return dict(obj)


# -- config fields ----------------------------------------------------------------------------------
class FieldReader:
    """Typed access to one JSON object of a config file; errors name the file and the dotted field."""

    def __init__(self, data: Mapping[str, Any], source: str, prefix: str = ""):
        self.data = data
        self.source = source
        self.prefix = prefix

    def where(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def fail(self, key: str, problem: str) -> CheckpointError:
        return CheckpointError(f"{self.source}: config field {self.where(key)!r} {problem}")

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        if key in self.data:
            return self.data[key]
        if default is _MISSING:
            raise self.fail(key, "is missing")
        return default

    def sub(self, key: str) -> "FieldReader":
        value = self.raw(key)
        if not isinstance(value, Mapping):
            raise self.fail(key, f"must be an object, got {value!r}")
        return FieldReader(value, self.source, f"{self.where(key)}.")

    def int(self, key: str, default: Any = _MISSING, *, minimum: int | None = None, optional: bool = False) -> int | None:
        value = self.raw(key, default)
        if value is None and optional:
            return None
        # JSON writers sometimes store integers as floats (2048.0); accept those, nothing else
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not is_int(value):
            raise self.fail(key, f"must be an integer{' or null' if optional else ''}, got {value!r}")
        if minimum is not None and value < minimum:
            raise self.fail(key, f"is out of range: must be >= {minimum}, got {value}")
        return value

    def float(self, key: str, default: Any = _MISSING, *, positive: bool = False, optional: bool = False) -> float | None:
        value = self.raw(key, default)
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
            raise self.fail(key, f"must be a finite number, got {show(value)}")
        if positive and value <= 0:
            raise self.fail(key, f"is out of range: must be > 0, got {value}")
        return float(value)

    def bool(self, key: str, default: Any = _MISSING) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise self.fail(key, f"must be true or false, got {value!r}")
        return value

    def str(self, key: str, default: Any = _MISSING, *, optional: bool = False) -> str | None:
        value = self.raw(key, default)
        if value is None and optional:
            return None
        if not isinstance(value, str):
            raise self.fail(key, f"must be a string, got {value!r}")
        return value

    def require(self, key: str, expected: Any, default: Any = _MISSING, why: str = "") -> None:
        """Fail unless the field equals ``expected`` (a feature blt-decode does not implement)."""
        value = self.raw(key, default)
        if value != expected:
            raise self.fail(key, f"is {value!r}; blt-decode supports only {expected!r}" + (f" ({why})" if why else ""))


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def build_config(source: str, **kwargs: Any) -> BLTConfig:
    """A BLTConfig, with any validation failure reported against the checkpoint file; a config whose
    tensors cannot even be described (sizes beyond 64 bits) is refused here too."""
    try:
        config = BLTConfig(**kwargs)
    except ConfigError as exc:
        raise CheckpointError(f"{source}: {exc}") from None
    expected_shapes(config, source)
    return config


# -- tensors ----------------------------------------------------------------------------------------
def check_tensors(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, torch.Tensor], source: str) -> None:
    """Fail, naming the tensor, on the first missing, unexpected or misshapen tensor (names as in the file)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))

    def more(names: list[str]) -> str:
        return f" (and {len(names) - 1} more)" if len(names) > 1 else ""

    if missing:
        raise CheckpointError(f"{source}: missing tensor {missing[0]!r}{more(missing)}")
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor {unexpected[0]!r}{more(unexpected)}")
    for name in sorted(expected):
        got = tuple(found[name].shape)
        if got != tuple(expected[name]):
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {got}, the config expects {tuple(expected[name])}"
            )


def on_meta(make: Callable[[], ModuleT], source: str) -> ModuleT:
    """``make()`` built on the meta device (no memory, no initialisation).

    Sizes that pass a config's checks can still describe a tensor torch cannot represent (a hash table of
    2**62 rows of 32 values overflows the byte count); that is reported against ``source``.
    """
    try:
        with torch.device("meta"):
            return make()
    except (RuntimeError, TypeError, ValueError, OverflowError) as exc:
        raise CheckpointError(
            f"{source}: the config describes tensors too large to build ({_first_line(str(exc))})"
        ) from None


def meta_model(config: BLTConfig, source: str = "config") -> BLTModel:
    """A model with ``config`` on the meta device (see :func:`on_meta`)."""
    return on_meta(lambda: BLTModel(config), source)


def expected_shapes(config: BLTConfig, source: str = "config") -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of a model with ``config``."""
    return {k: tuple(v.shape) for k, v in meta_model(config, source).state_dict().items()}


#: dtypes a checkpoint's weights may have; anything else (integers, complex, float8 without its scales)
#: would be converted silently into different weights, so it is refused
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def build_model(config: BLTConfig, tensors: Mapping[str, torch.Tensor], source: str, *,
                dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> BLTModel:
    """A model whose every parameter comes from ``tensors`` (native names).

    The model is built on the meta device and the tensors are assigned, so nothing is randomly
    initialised and a tensor the checkpoint lacks cannot go unnoticed. ``dtype`` defaults to float32.
    """
    return assign_tensors(meta_model(config, source), tensors, source, dtype=dtype, device=device)


def assign_tensors(module: ModuleT, tensors: Mapping[str, torch.Tensor], source: str, *,
                   dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> ModuleT:
    """``module`` (built on the meta device) holding ``tensors``, each checked first by name, shape,
    dtype and finiteness and copied into owned, aligned storage of ``dtype`` (default float32)."""
    check_tensors({k: tuple(v.shape) for k, v in module.state_dict().items()}, tensors, source)
    for name, tensor in tensors.items():
        if tensor.dtype not in WEIGHT_DTYPES:
            allowed = ", ".join(str(d).removeprefix("torch.") for d in WEIGHT_DTYPES)
            raise CheckpointError(f"{source}: tensor {name!r} has dtype {str(tensor.dtype).removeprefix('torch.')}; "
                                  f"weights must be floating point ({allowed})")
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"{source}: tensor {name!r} holds NaN or infinite values")
    target_dtype = dtype or torch.float32
    target_device = torch.device(device) if device is not None else torch.device("cpu")
    state = {k: owned_copy(v, target_dtype, target_device) for k, v in tensors.items()}
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval()


def owned_copy(tensor: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``tensor`` in a fresh contiguous allocation of ``dtype`` on ``device``.

    Tensors read from a file are views into its buffer (the safetensors mmap, or one fused table) at
    whatever byte offset the file put them, often not 16-byte aligned. Kernels then take slower paths and
    round differently (an HF checkpoint's logits differed from the same weights' by ~1e-6), and the view
    keeps the whole file buffer alive. ``Tensor.to`` returns its input unchanged when dtype and device
    already match, so the copy is made explicitly; a fresh allocation is aligned by the allocator (64 bytes
    on the CPU). A tensor that already is such an allocation (what ``torch.load`` gives for a tensor saved on
    its own) is used as is, so loading does not hold two copies of it.
    """
    if owns_aligned_storage(tensor) and tensor.dtype == dtype and tensor.device == device:
        return tensor
    out = torch.empty(tensor.shape, dtype=dtype, device=device)
    out.copy_(tensor)
    return out


def owns_aligned_storage(tensor: torch.Tensor, alignment: int = 64) -> bool:
    """Is ``tensor`` contiguous, the whole of its storage, and at an ``alignment``-byte aligned address?"""
    return (tensor.is_contiguous() and tensor.storage_offset() == 0
            and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
            and tensor.data_ptr() % alignment == 0)


def cpu_state_dict(model: BLTModel) -> dict[str, torch.Tensor]:
    """The model's tensors on the CPU, each with its own storage (safe for safetensors and torch.save)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
