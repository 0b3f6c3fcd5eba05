"""What a training run writes: model checkpoints and the trainer state, as JSON + safetensors only
(docs/training.md, "Checkpoints and logs")."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import attrs
import torch
from safetensors.torch import load_file, save_file

from blt_decode.checkpoints.native import CONFIG_FILE, FORMAT_NAME, FORMAT_VERSION, WEIGHTS_FILE, save_model, shareable
from blt_decode.checks import is_int, loads_json, show
from blt_decode.errors import CheckpointError, ConfigError, TrainingError
from blt_decode.model.blt import BLTModel, EntropyModel
from blt_decode.model.config import BLTConfig, TransformerConfig
from blt_decode.model.tokenizer import VOCAB_SIZE

BYTE_LM_FORMAT = "blt-decode-byte-lm"
#: trainer state of a checkpoint: JSON (step, options, optimizer hyper-parameters) + safetensors
#: (optimizer moments, RNG state); nothing is pickled
TRAINER_STATE = "trainer_state.json"
TRAINER_TENSORS = "trainer_state.safetensors"
TRAINER_STATE_FORMAT = "blt-decode-trainer-state"
#: the largest trainer_state.json read (it holds options and hyper-parameters, a few KiB; the tensors are
#: in the safetensors file)
MAX_TRAINER_STATE_BYTES = 64 << 20
#: what earlier versions wrote: a pickle, never read (unpickling a crafted file runs code)
LEGACY_TRAINER_STATE = "trainer_state.pt"


# -- byte-LM checkpoints (entropy model, baseline) -----------------------------------------------------
def save_byte_lm(module: EntropyModel, path: str | Path, *, metadata: dict | None = None,
                 state: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write a byte LM (``config.json`` + ``model.safetensors``); ``state`` overrides its tensors (the
    full tensors gathered from a sharded model)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    payload = {"format": BYTE_LM_FORMAT, "version": 1, "config": attrs.asdict(module.cfg), "metadata": shareable(metadata or {})}
    (path / "config.json").write_text(json.dumps(payload, indent=2) + "\n")
    tensors = state if state is not None else module.state_dict()
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path / "model.safetensors"))
    return path


def load_byte_lm(path: str | Path) -> EntropyModel:
    """Load a byte LM written by :func:`save_byte_lm`. Every problem (a missing, truncated or non-object
    ``config.json``, a config field that is unknown, missing or out of range, a corrupt safetensors file,
    a tensor missing, unexpected, misshapen or not finite) is one :class:`CheckpointError` naming the file,
    through the same readers and checks as the model formats (:mod:`blt_decode.checkpoints._common`)."""
    from blt_decode.checkpoints._common import read_json, read_safetensors

    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{path}: no byte-LM config.json (not a checkpoint directory written by `blt-decode train`)")
    payload = read_json(config_path)
    if payload.get("format") != BYTE_LM_FORMAT:
        raise CheckpointError(f"{path} is not a byte-LM checkpoint (format {payload.get('format')!r}, "
                              f"expected {BYTE_LM_FORMAT!r})")
    fields = payload.get("config")
    if not isinstance(fields, dict):
        raise CheckpointError(f"{config_path}: 'config' must be an object with the TransformerConfig fields")
    cfg = _stack_config(fields, str(config_path))
    weights = path / "model.safetensors"
    return build_byte_lm(cfg, read_safetensors(weights), str(weights))


def _stack_config(fields: Mapping[str, Any], source: str) -> TransformerConfig:
    """The byte LM's :class:`TransformerConfig`; a field that is unknown, missing or out of range is a
    CheckpointError naming the file (not the TypeError of ``TransformerConfig(**fields)``)."""
    names = {f.name: f for f in attrs.fields(TransformerConfig)}
    unknown = sorted(str(k) for k in set(fields) - set(names))
    if unknown:
        raise CheckpointError(f"{source}: unknown config field(s): {', '.join(unknown)}")
    missing = [n for n, f in names.items() if f.default is attrs.NOTHING and n not in fields]
    if missing:
        raise CheckpointError(f"{source}: missing config field(s): {', '.join(missing)}")
    try:
        return TransformerConfig(**fields)
    except ConfigError as exc:
        raise CheckpointError(f"{source}: {exc}") from None


def build_byte_lm(cfg: TransformerConfig, tensors: Mapping[str, torch.Tensor], source: str) -> EntropyModel:
    """A float32 byte LM holding ``tensors``, checked by name, shape, dtype and finiteness first (built on
    the meta device, so a config that does not match its tensors allocates nothing)."""
    from blt_decode.checkpoints._common import assign_tensors, on_meta

    return assign_tensors(on_meta(lambda: EntropyModel(cfg, VOCAB_SIZE), source), tensors, source)


def save_any(model: BLTModel | EntropyModel, path: Path, metadata: dict[str, Any],
             state: Mapping[str, torch.Tensor] | None = None) -> None:
    """A BLT in the native format, a byte LM in the byte-LM format (``state``: full tensors to write)."""
    if isinstance(model, BLTModel):
        if state is None:
            save_model(model, path, metadata=metadata)
        else:
            path.mkdir(parents=True, exist_ok=True)
            # the native format as checkpoint.save_model writes it, from gathered tensors
            payload = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "config": model.config.to_dict(),
                       "metadata": shareable(metadata)}
            (path / CONFIG_FILE).write_text(json.dumps(payload, indent=2) + "\n")
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path / WEIGHTS_FILE))
    else:
        save_byte_lm(model, path, metadata=metadata, state=state)


# -- the trainer state ---------------------------------------------------------------------------------
def trainer_state_files(optimizer_state: Mapping[str, Any], names: Sequence[str], step: int, config: dict[str, Any],
                        extra: dict[str, Any], corpus: str | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The trainer state as (JSON-able dict, named tensors). ``optimizer_state`` is an optimizer's
    ``state_dict()`` with full tensors; ``names[i]`` names the i-th parameter it holds; ``corpus`` is the
    training corpus's version string (``--resume`` refuses another corpus)."""
    tensors: dict[str, torch.Tensor] = {"rng/torch_cpu": torch.get_rng_state()}
    scalars: dict[str, dict[str, Any]] = {}
    for index, per_param in optimizer_state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{names[index]}/{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(names[index], {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
              | {"params": [names[i] for i in g["params"]]} for g in optimizer_state["param_groups"]]
    payload = {"format": TRAINER_STATE_FORMAT, "version": 1, "step": step, "config": config, "corpus": corpus,
               "extra": extra, "param_groups": groups, "scalar_state": scalars}
    return payload, tensors


def optimizer_state_from_files(names: Sequence[str], payload: dict[str, Any], tensors: Mapping[str, torch.Tensor],
                               source: str) -> dict[str, Any]:
    """An optimizer ``state_dict()`` (full tensors) for parameters ``names``, from what
    :func:`trainer_state_files` saved; a :class:`TrainingError` when the parameters do not match."""
    saved = [n for g in payload["param_groups"] for n in g["params"]]
    if saved != list(names):
        missing = sorted(set(names) ^ set(saved))[:3]
        raise TrainingError(f"{source}: the optimizer state is for other parameters ({missing or 'order differs'})")
    index = {n: i for i, n in enumerate(names)}
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer/"):
            name, _, field = key.removeprefix("optimizer/").rpartition("/")
            if name not in index:
                raise TrainingError(f"{source}: optimizer state {key!r} names no parameter of this model")
            state.setdefault(index[name], {})[field] = value
    for name, fields in payload.get("scalar_state", {}).items():
        if name not in index:
            raise TrainingError(f"{source}: 'scalar_state' names {show(name)}, no parameter of this model")
        state.setdefault(index[name], {}).update(fields)
    groups = []
    for group in payload["param_groups"]:
        # betas were a tuple: restore it so the optimizer sees exactly what it saved
        restored = {k: (tuple(v) if k == "betas" else v) for k, v in group.items() if k != "params"}
        groups.append(restored | {"params": [index[n] for n in group["params"]]})
    return {"state": state, "param_groups": groups}


def _sibling(directory: Path, suffix: str) -> Path:
    return directory.with_name(directory.name + suffix)


def write_checkpoint(model: BLTModel | EntropyModel, directory: Path, *, metadata: dict[str, Any],
                     trainer_json: dict[str, Any], trainer_tensors: dict[str, torch.Tensor],
                     state: Mapping[str, torch.Tensor] | None = None) -> None:
    """Write a run checkpoint so that a complete one exists at every moment: the new one goes to
    ``DIR.tmp`` (``trainer_state.json`` last, so its presence marks the directory complete), the old one
    is renamed to ``DIR.old``, ``DIR.tmp`` to ``DIR``, and only then is ``DIR.old`` deleted. An
    interruption anywhere leaves ``DIR``, or a complete ``DIR.tmp`` or ``DIR.old`` that
    :func:`find_checkpoint` resumes from."""
    tmp, old = _sibling(directory, ".tmp"), _sibling(directory, ".old")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_any(model, tmp, metadata, state)
    save_file(trainer_tensors, str(tmp / TRAINER_TENSORS))
    (tmp / TRAINER_STATE).write_text(json.dumps(trainer_json, indent=1) + "\n")
    if directory.exists():
        if old.exists():  # left by an earlier interrupted write; DIR is complete and newer
            shutil.rmtree(old)
        directory.rename(old)
    tmp.rename(directory)
    if old.exists():
        shutil.rmtree(old)


def _complete(directory: Path) -> bool:
    # trainer_state.json is written last (write_checkpoint), so a readable one marks a finished write
    try:
        path = directory / TRAINER_STATE
        if not path.is_file() or path.stat().st_size > MAX_TRAINER_STATE_BYTES:
            return False
        loads_json(path.read_bytes())
    except (OSError, ValueError):
        return False
    return (directory / TRAINER_TENSORS).is_file()


def find_checkpoint(directory: Path) -> tuple[Path, str | None]:
    """The checkpoint to resume from: ``directory`` itself, or, when a write was interrupted between
    its renames (``directory`` missing), the complete ``.tmp`` (the newer) or ``.old`` left beside it;
    with a note saying which was taken (None when ``directory`` is there). A :class:`TrainingError` when
    there is none (a run stopped before its first checkpoint was complete)."""
    if directory.exists():
        return directory, None
    for suffix, what in ((".tmp", "the newer checkpoint that was being put in place"),
                         (".old", "the previous checkpoint")):
        candidate = _sibling(directory, suffix)
        if candidate.is_dir() and _complete(candidate):
            return candidate, (f"{directory} is missing (a checkpoint write was interrupted): resuming from "
                               f"{candidate}, {what}")
    partial = _sibling(directory, ".tmp")
    why = (f"the only checkpoint, {partial}, is incomplete (the run was stopped while writing its first checkpoint)"
           if partial.exists() else f"{directory} does not exist (the run wrote no checkpoint)")
    raise TrainingError(f"nothing to resume: {why}; start the run again in a new --out directory, or delete "
                        f"{directory.parent} first")


def read_trainer_state(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The JSON and tensors of a checkpoint's trainer state. Never unpickles: a legacy
    ``trainer_state.pt`` (a pickle) is refused with a :class:`TrainingError`, not read."""
    state_path, tensor_path = directory / TRAINER_STATE, directory / TRAINER_TENSORS
    if not state_path.is_file():
        if (directory / LEGACY_TRAINER_STATE).exists():
            raise TrainingError(
                f"{directory / LEGACY_TRAINER_STATE} is a pickle (written by an older blt-decode or planted); it is "
                f"never loaded because unpickling can run code: resume needs {TRAINER_STATE} + {TRAINER_TENSORS}, "
                f"so start the run again")
        raise TrainingError(f"{directory} holds no {TRAINER_STATE}: not a training checkpoint")
    try:
        size = state_path.stat().st_size
        if size > MAX_TRAINER_STATE_BYTES:  # JSON of options and hyper-parameters: kilobytes
            raise TrainingError(f"{state_path} is {size} bytes, more than a trainer state's "
                                f"{MAX_TRAINER_STATE_BYTES >> 20} MiB: not a trainer state")
        payload = loads_json(state_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise TrainingError(f"{state_path} is not readable JSON ({exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != TRAINER_STATE_FORMAT or payload.get("version") != 1:
        raise TrainingError(f"{state_path} is not a version-1 {TRAINER_STATE_FORMAT} file")
    check_trainer_state(payload, str(state_path))
    if not tensor_path.is_file():
        raise TrainingError(f"{directory} holds {TRAINER_STATE} but no {TRAINER_TENSORS}")
    try:
        tensors = load_file(str(tensor_path))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise TrainingError(f"{tensor_path} is not a readable safetensors file ({exc})") from None
    rng = tensors.get("rng/torch_cpu")
    if rng is None or rng.dtype != torch.uint8 or rng.dim() != 1:
        raise TrainingError(f"{tensor_path} holds no 'rng/torch_cpu' tensor of bytes (the CPU random state)")
    return payload, tensors


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


#: the trainer state's ``extra`` entries that resuming reads, with their checks (others are carried as they are)
_EXTRA_FIELDS: dict[str, tuple[Any, str]] = {
    "bytes_seen": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    "wall_time_s": (lambda v: _is_number(v) and v >= 0, "a finite number >= 0"),
    "patching_threshold": (_is_number, "a finite number"),
    "init": (lambda v: isinstance(v, str), "a string"),
}


def check_trainer_state(payload: dict[str, Any], source: str) -> None:
    """Every field of a trainer state that resuming reads, by type, so that a hand-edited or corrupt file
    (``"step": "two"``) is one :class:`TrainingError` naming the file and the field, not a ValueError or a
    KeyError in the middle of resuming."""
    from blt_decode.training.config import MAX_STEPS

    def refuse(field: str, allowed: str, value: Any) -> TrainingError:
        return TrainingError(f"{source}: {field} must be {allowed}, got {show(value)}")

    for name in ("step", "config", "extra", "param_groups"):
        if name not in payload:
            raise TrainingError(f"{source} has no {name!r} field: not a complete trainer state")
    if not is_int(payload["step"]) or not 0 <= payload["step"] <= MAX_STEPS:
        raise refuse("'step'", f"an integer in 0..{MAX_STEPS}", payload["step"])
    if not isinstance(payload["config"], dict):
        raise refuse("'config'", "an object (the run's options)", payload["config"])
    if payload.get("corpus") is not None and not isinstance(payload["corpus"], str):
        raise refuse("'corpus'", "a string or null", payload["corpus"])
    extra = payload["extra"]
    if not isinstance(extra, dict):
        raise refuse("'extra'", "an object", extra)
    for name, (check, allowed) in _EXTRA_FIELDS.items():
        if name in extra and not check(extra[name]):
            raise refuse(f"'extra'.{name}", allowed, extra[name])
    groups = payload["param_groups"]
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise refuse("'param_groups'", "a list of objects", groups)
    for number, group in enumerate(groups):
        params = group.get("params")
        if not isinstance(params, list) or not all(isinstance(n, str) for n in params):
            raise refuse(f"'param_groups'[{number}].params", "a list of parameter names", params)
        for key, value in group.items():
            plain = value is None or isinstance(value, bool) or _is_number(value) \
                or (isinstance(value, list) and all(_is_number(v) for v in value))
            if key != "params" and not plain:
                raise refuse(f"'param_groups'[{number}].{key}", "a number, true/false, null or a list of numbers", value)
    scalars = payload.get("scalar_state", {})
    if not isinstance(scalars, dict) or not all(isinstance(v, dict) for v in scalars.values()):
        raise refuse("'scalar_state'", "an object of objects (per parameter)", scalars)
    for name, fields in scalars.items():
        for key, value in fields.items():
            if not (_is_number(value) or isinstance(value, bool)):
                raise refuse(f"'scalar_state'.{name}.{key}", "a number", value)


def config_of(model: BLTModel | EntropyModel) -> BLTConfig | TransformerConfig:
    """The config a model was built from."""
    return model.config if isinstance(model, BLTModel) else model.cfg
