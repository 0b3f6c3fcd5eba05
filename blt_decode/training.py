"""Training: the entropy model, the BLT-D model, and a plain byte-level transformer baseline.

Recipe (see docs/training.md):

1. ``entropy``: a small causal byte LM trained with next-byte loss; it drives patching and is then
   frozen. Saved in the byte-LM format (``config.json`` + ``model.safetensors``).
2. ``blt``: the BLT-D model. The trained entropy model is loaded and frozen, the patching threshold θ is
   set so that patches on a sample of the training stream average ``target_patch_length`` bytes, and the
   whole BLT is trained with next-byte loss on the clean sequence plus the block masked-diffusion loss:
   a block of B bytes at every patch start except BOS (blocks overlap; PAD past the end), t ~ U(t_min, 1)
   per block, each byte masked with probability t, masked positions weighted by 1/t. B cycles through
   ``block_sizes`` from step to step so that one model decodes with every B of the mix.
3. ``bytelm``: the baseline, a plain byte-level causal transformer of about the BLT's size.

Runs are reproducible from the seed: initial weights come from the seed, batch ``step`` and its
corruption depend only on (seed, step), so a run resumed from a checkpoint continues exactly as an
uninterrupted one would (same thread count assumed). The learning-rate schedule is a function of the step
and ``steps``; ``time_budget_s`` only stops a run early (and then saves a checkpoint).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import attrs
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from blt_decode import tokenizer
from blt_decode.checkpoint import load_native, save_model
from blt_decode.config import BLTConfig, TransformerConfig, stack_config
from blt_decode.corpus import BatchSampler, Corpus, build_corpus
from blt_decode.errors import BLTDecodeError, CheckpointError
from blt_decode.model import MASK_ID, BLTModel, EntropyModel, PatchLayout, diffusion_forward, init_weights
from blt_decode.tokenizer import PAD_ID, VOCAB_SIZE

ModelKind = Literal["entropy", "blt", "bytelm"]
BYTE_LM_FORMAT = "blt-decode-byte-lm"
#: trainer state of a checkpoint: JSON (step, options, optimizer hyper-parameters) + safetensors
#: (optimizer moments, RNG state); nothing is pickled
TRAINER_STATE = "trainer_state.json"
TRAINER_TENSORS = "trainer_state.safetensors"
TRAINER_STATE_FORMAT = "blt-decode-trainer-state"
#: what earlier versions wrote: a pickle, never read (unpickling a crafted file runs code)
LEGACY_TRAINER_STATE = "trainer_state.pt"
TRAINING_JSON = "training.json"


class TrainingError(BLTDecodeError):
    """Training cannot start or resume (bad options, mismatched checkpoint)."""


#: Sizes of the models trained by ``blt-decode train`` (BLT's proportions: the global model holds most
#: of the parameters). ``tiny`` is for tests.
ENTROPY_PRESETS: dict[str, TransformerConfig] = {
    "default": stack_config(128, 2, 4, 512),
    "tiny": stack_config(32, 1, 2, 64),
}
BLT_PRESETS: dict[str, BLTConfig] = {
    "default": BLTConfig(
        encoder=stack_config(128, 1, 4, 512),
        global_=stack_config(256, 4, 4, None),
        decoder=stack_config(128, 2, 4, 512),
        entropy_model=ENTROPY_PRESETS["default"],
        encoder_hash_byte_group_size=(3, 4, 5, 6, 7, 8),
        encoder_hash_byte_group_vocab=2053,
        max_seqlen=4096,
    ),
    "tiny": BLTConfig(
        encoder=stack_config(32, 1, 2, 64),
        global_=stack_config(64, 2, 4, None),
        decoder=stack_config(32, 1, 2, 64),
        entropy_model=ENTROPY_PRESETS["tiny"],
        encoder_hash_byte_group_size=(3, 4),
        encoder_hash_byte_group_vocab=257,
        max_seqlen=1024,
    ),
}
#: The baseline plain byte-level transformer, sized like the default BLT's non-embedding parameters.
BYTELM_PRESETS: dict[str, TransformerConfig] = {
    "default": stack_config(256, 5, 4, 512),
    "tiny": stack_config(32, 2, 2, 64),
}


def _block_sizes(value: Sequence[int]) -> tuple[int, ...]:
    sizes = tuple(int(v) for v in value)
    if not sizes or any(b <= 0 for b in sizes):
        raise TrainingError(f"block_sizes must be positive integers, got {value!r}")
    return sizes


@attrs.frozen
class TrainConfig:
    kind: ModelKind = attrs.field(validator=attrs.validators.in_(("entropy", "blt", "bytelm")))
    out_dir: str
    preset: str = "default"
    seq_len: int = attrs.field(default=512, validator=attrs.validators.ge(8))
    batch_size: int = attrs.field(default=8, validator=attrs.validators.ge(1))
    steps: int = attrs.field(default=1000, validator=attrs.validators.ge(1))
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    #: stop (and checkpoint) after this many seconds of training; None = run all steps
    time_budget_s: float | None = None
    eval_every: int = 200
    #: held-out bytes per kind for the periodic evaluation (the final evaluation uses eval_bytes_final)
    eval_bytes: int = 16384
    eval_bytes_final: int = 131072
    checkpoint_every: int = 200
    bf16: bool = False
    threads: int | None = None
    # -- BLT-D only ------------------------------------------------------------------------------
    #: trained entropy model (byte-LM checkpoint directory) for kind="blt"
    entropy_model: str | None = None
    block_sizes: tuple[int, ...] = attrs.field(default=(4, 8, 16), converter=_block_sizes)
    #: the smallest diffusion time; avoids 1/t blowing up (t ~ U(t_min, 1))
    t_min: float = 1e-3
    #: θ is set so that patches on the training stream average this many bytes
    target_patch_length: float = 4.5
    diffusion_weight: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


# -- losses ------------------------------------------------------------------------------------------
def next_byte_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats) of predicting ids[:, 1:] from logits[:, :-1]."""
    return F.cross_entropy(_at_least_f32(logits[:, :-1].reshape(-1, logits.shape[-1])), ids[:, 1:].reshape(-1))


def _at_least_f32(x: torch.Tensor) -> torch.Tensor:
    # losses in float32 at least (bf16 autocast), but keep float64 when the model runs in it
    return x.to(torch.promote_types(x.dtype, torch.float32))


def diffusion_loss(block_logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor, t: torch.Tensor,
                   valid: torch.Tensor) -> torch.Tensor:
    """The block masked-diffusion loss: cross-entropy at masked positions weighted by 1/t, summed and
    divided by the number of valid (non-PAD) block positions.

    block_logits [N, L, V]; targets, masked, t, valid: [N, L] (t is the block's time at each position).
    Zero when nothing is masked. Its expectation over the masking is the mean cross-entropy of the
    positions, since each is masked with probability t.
    """
    ce = F.cross_entropy(_at_least_f32(block_logits.reshape(-1, block_logits.shape[-1])), targets.reshape(-1),
                         reduction="none").view_as(targets)
    weight = masked.to(ce.dtype) / t.to(ce.dtype)
    count = valid.sum().clamp(min=1)
    return (ce * weight).sum() / count


@attrs.frozen
class NoisyBlocks:
    block_starts: tuple[tuple[int, ...], ...]  #: per row: the patch starts that carry a block
    block_size: int
    noisy: torch.Tensor  #: [N, nb*B] decoder input ids (MASK where masked, PAD past the end / padding)
    targets: torch.Tensor  #: [N, nb*B] clean ids (PAD where invalid)
    masked: torch.Tensor  #: [N, nb*B] bool
    t: torch.Tensor  #: [N, nb*B] the block's diffusion time (1 where invalid)
    valid: torch.Tensor  #: [N, nb*B] bool: a real byte of the sequence (not PAD)


def make_blocks(ids: torch.Tensor, layout: PatchLayout, block_size: int, generator: torch.Generator,
                t_min: float = 1e-3) -> NoisyBlocks:
    """Blocks of ``block_size`` at every patch start except BOS (position 0), t ~ U(t_min, 1) per block,
    each real byte masked with probability t; PAD past the sequence end (never masked, no loss)."""
    n, length = ids.shape
    rows = tuple(tuple(s for s in starts if 0 < s < length) for starts in layout.starts)
    nb = max(1, max(len(r) for r in rows))
    lb = nb * block_size
    targets = torch.full((n, lb), PAD_ID, dtype=torch.long)
    t = torch.ones(n, lb)
    valid = torch.zeros(n, lb, dtype=torch.bool)
    for r, starts in enumerate(rows):
        times = t_min + (1 - t_min) * torch.rand(len(starts), generator=generator)
        for j, (s, tb) in enumerate(zip(starts, times.tolist())):
            col = j * block_size
            real = min(block_size, length - s)
            targets[r, col : col + real] = ids[r, s : s + real]
            valid[r, col : col + real] = True
            t[r, col : col + block_size] = tb
    masked = (torch.rand(n, lb, generator=generator) < t) & valid
    noisy = torch.where(masked, torch.full_like(targets, MASK_ID), targets)
    if nb > max(len(r) for r in rows):  # no block at all in the batch: one dummy PAD block keeps shapes valid
        rows = tuple((1,) if not r else r for r in rows)
    return NoisyBlocks(rows, block_size, noisy.to(ids.device), targets.to(ids.device), masked.to(ids.device),
                       t.to(ids.device), valid.to(ids.device))


# -- byte-LM checkpoints (entropy model, baseline) -----------------------------------------------------
def save_byte_lm(module: EntropyModel, path: str | Path, *, metadata: dict | None = None) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    payload = {"format": BYTE_LM_FORMAT, "version": 1, "config": attrs.asdict(module.cfg), "metadata": metadata or {}}
    (path / "config.json").write_text(json.dumps(payload, indent=2) + "\n")
    save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}, str(path / "model.safetensors"))
    return path


def load_byte_lm(path: str | Path) -> EntropyModel:
    path = Path(path)
    try:
        payload = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: no readable byte-LM config.json ({exc})") from None
    if payload.get("format") != BYTE_LM_FORMAT:
        raise CheckpointError(f"{path} is not a byte-LM checkpoint (format {payload.get('format')!r})")
    module = EntropyModel(TransformerConfig(**payload["config"]), VOCAB_SIZE)
    tensors = load_file(str(path / "model.safetensors"))
    missing = set(module.state_dict()) ^ set(tensors)
    if missing:
        raise CheckpointError(f"{path}: tensor names do not match the config: {sorted(missing)[:3]}")
    module.load_state_dict(tensors)
    return module.eval()


# -- evaluation --------------------------------------------------------------------------------------
@torch.no_grad()
def byte_lm_bits_per_byte(module: EntropyModel, data: bytes, chunk_bytes: int) -> float:
    """Bits per byte of ``data`` under a byte LM, chunked exactly like :func:`blt_decode.score`
    (every chunk a fresh sequence starting with BOS)."""
    total, count = 0.0, 0
    for lo in range(0, len(data), chunk_bytes):
        ids = torch.tensor([tokenizer.encode(data[lo : lo + chunk_bytes])])
        logp = torch.log_softmax(module(ids).double(), dim=-1)[0, :-1]
        total -= float(logp.gather(-1, ids[0, 1:, None]).sum())
        count += ids.shape[1] - 1
    return total / math.log(2) / count


def evaluate(model: BLTModel | EntropyModel, corpus: Corpus, max_bytes: int | None, chunk_bytes: int) -> dict[str, float]:
    """Held-out bits-per-byte for code and for plays (``blt_decode.score`` for a BLT)."""
    from blt_decode.api import score

    out = {}
    was_training = model.training
    model.eval()
    for kind in ("code", "plays"):
        text = corpus.heldout_text(kind, max_bytes)
        if isinstance(model, BLTModel):
            out[kind] = score(model, text, chunk_bytes=chunk_bytes).bits_per_byte
        else:
            out[kind] = byte_lm_bits_per_byte(model, text, chunk_bytes)
    model.train(was_training)
    return out


@torch.no_grad()
def mean_patch_length(model: BLTModel, data: bytes, chunk_bytes: int) -> float:
    """Mean bytes per patch of ``data`` (BOS patches left out), chunked like :func:`evaluate`."""
    patches, count = 0, 0
    for lo in range(0, len(data), chunk_bytes):
        ids = torch.tensor([tokenizer.encode(data[lo : lo + chunk_bytes])])
        starts = model.patch_layout(ids).starts[0]
        patches += sum(1 for s in starts if 0 < s < ids.shape[1])
        count += ids.shape[1] - 1
    return count / max(patches, 1)


@torch.no_grad()
def calibrate_threshold(entropy_model: EntropyModel, sample: np.ndarray, seq_len: int, target: float) -> float:
    """θ such that the share of positions whose entropy exceeds θ is 1/target on a sample of the
    stream, i.e. patches average ``target`` bytes."""
    rows = len(sample) // seq_len
    if rows == 0:
        raise TrainingError("the calibration sample is shorter than one sequence")
    ids = torch.as_tensor(sample[: rows * seq_len].astype(np.int64)).view(rows, seq_len)
    ids[:, 0] = tokenizer.BOS_ID
    ent = torch.cat([_entropy(entropy_model(ids[i : i + 8])) for i in range(0, rows, 8)])
    return float(torch.quantile(ent[:, 1:].flatten().double(), 1.0 - 1.0 / target))


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.double(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


# -- the loop ----------------------------------------------------------------------------------------
def lr_at(config: TrainConfig, step: int) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@attrs.frozen
class TrainResult:
    out_dir: str
    steps: int
    wall_time_s: float
    bytes_seen: int
    final_loss: float
    heldout_bpb: dict[str, float]
    mean_patch_length_code: float | None
    params: int


def build_model(config: TrainConfig) -> BLTModel | EntropyModel:
    gen = torch.Generator().manual_seed(config.seed)
    if config.kind == "blt":
        if config.preset not in BLT_PRESETS:
            raise TrainingError(f"unknown BLT preset {config.preset!r}; choose from {sorted(BLT_PRESETS)}")
        if config.entropy_model is None:
            raise TrainingError("training the BLT needs a trained entropy model: pass --entropy-model DIR")
        entropy = load_byte_lm(config.entropy_model)
        cfg = attrs.evolve(BLT_PRESETS[config.preset], entropy_model=entropy.cfg,
                           max_seqlen=max(BLT_PRESETS[config.preset].max_seqlen, config.seq_len))
        model = init_weights(BLTModel(cfg), gen)
        model.entropy_model.load_state_dict(entropy.state_dict())
        return model
    presets = ENTROPY_PRESETS if config.kind == "entropy" else BYTELM_PRESETS
    if config.preset not in presets:
        raise TrainingError(f"unknown {config.kind} preset {config.preset!r}; choose from {sorted(presets)}")
    module = EntropyModel(presets[config.preset], VOCAB_SIZE)
    # reuse BLT's initialisation scheme on the stand-alone stack
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
                std = m.weight.shape[-1] ** -0.5
                m.weight.copy_(torch.nn.init.trunc_normal_(torch.empty_like(m.weight), std=std, a=-3 * std, b=3 * std, generator=gen))
    return module


def _trainable_named(model: BLTModel | EntropyModel) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of what the optimizer trains: all but the frozen entropy model of a BLT."""
    if isinstance(model, BLTModel):
        # the entropy model is trained first and frozen
        return [(name, p) for name, p in model.named_parameters() if not name.startswith("entropy_model.")]
    return list(model.named_parameters())


def trainer_state_files(optimizer: torch.optim.Optimizer, names: Sequence[str], step: int, config: TrainConfig,
                        extra: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The trainer state as (JSON-able dict, named tensors): the optimizer state keyed by parameter name,
    its hyper-parameters, the step, the options and the global RNG state. ``names[i]`` names the i-th
    parameter the optimizer holds."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {"rng/torch_cpu": torch.get_rng_state()}
    scalars: dict[str, dict[str, Any]] = {}
    for index, per_param in state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{names[index]}/{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(names[index], {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
              | {"params": [names[i] for i in g["params"]]} for g in state["param_groups"]]
    payload = {"format": TRAINER_STATE_FORMAT, "version": 1, "step": step, "config": config.to_dict(),
               "extra": extra, "param_groups": groups, "scalar_state": scalars}
    return payload, tensors


def load_optimizer_state(optimizer: torch.optim.Optimizer, names: Sequence[str], payload: dict[str, Any],
                         tensors: dict[str, torch.Tensor], source: str) -> None:
    """Restore what :func:`trainer_state_files` saved into ``optimizer`` (whose i-th parameter is named
    ``names[i]``); a :class:`TrainingError` when the parameters do not match."""
    saved = [n for g in payload["param_groups"] for n in g["params"]]
    if saved != list(names):
        missing = sorted(set(names) ^ set(saved))[:3]
        raise TrainingError(f"{source}: the optimizer state is for other parameters ({missing or 'order differs'})")
    index = {n: i for i, n in enumerate(names)}
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer/"):
            name, _, field = key.removeprefix("optimizer/").rpartition("/")
            state.setdefault(index[name], {})[field] = value
    for name, fields in payload.get("scalar_state", {}).items():
        state.setdefault(index[name], {}).update(fields)
    groups = []
    for group in payload["param_groups"]:
        # betas were a tuple: restore it so the optimizer sees exactly what it saved
        restored = {k: (tuple(v) if k == "betas" else v) for k, v in group.items() if k != "params"}
        groups.append(restored | {"params": [index[n] for n in group["params"]]})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _save(model: BLTModel | EntropyModel, directory: Path, optimizer: torch.optim.Optimizer, names: Sequence[str],
          step: int, config: TrainConfig, extra: dict[str, Any]) -> None:
    """Write a checkpoint atomically: to a temporary directory, then renamed over the old one."""
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    meta = {"training": config.to_dict(), "step": step, **extra}
    if isinstance(model, BLTModel):
        save_model(model, tmp, metadata=meta)
    else:
        save_byte_lm(model, tmp, metadata=meta)
    payload, tensors = trainer_state_files(optimizer, names, step, config, extra)
    (tmp / TRAINER_STATE).write_text(json.dumps(payload, indent=1) + "\n")
    save_file(tensors, str(tmp / TRAINER_TENSORS))
    if directory.exists():
        shutil.rmtree(directory)
    tmp.rename(directory)


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
        payload = json.loads(state_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TrainingError(f"{state_path} is not readable JSON ({exc})") from None
    if payload.get("format") != TRAINER_STATE_FORMAT or payload.get("version") != 1:
        raise TrainingError(f"{state_path} is not a version-1 {TRAINER_STATE_FORMAT} file")
    if not tensor_path.is_file():
        raise TrainingError(f"{directory} holds {TRAINER_STATE} but no {TRAINER_TENSORS}")
    try:
        tensors = load_file(str(tensor_path))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise TrainingError(f"{tensor_path} is not a readable safetensors file ({exc})") from None
    return payload, tensors


def _load_for_resume(directory: Path, config: TrainConfig) -> tuple[BLTModel | EntropyModel, dict[str, Any],
                                                                    dict[str, torch.Tensor]]:
    state, tensors = read_trainer_state(directory)
    saved = dict(state["config"])
    mine = config.to_dict()
    differ = sorted(k for k in mine if k not in ("time_budget_s", "out_dir", "threads") and
                    (list(mine[k]) if isinstance(mine[k], tuple) else mine[k]) != (list(saved.get(k)) if isinstance(saved.get(k), (tuple, list)) else saved.get(k)))
    if differ:
        raise TrainingError(f"cannot resume: options differ from the checkpoint's: {', '.join(differ)}")
    model = load_native(directory) if config.kind == "blt" else load_byte_lm(directory)
    return model, state, tensors


def train(config: TrainConfig, *, corpus: Corpus | None = None, resume: bool = False,
          progress: bool = True, log: Callable[[str], None] = print, stop_after: int | None = None) -> TrainResult:
    """Train one model as ``config`` says; checkpoints go to ``out_dir/checkpoint`` and the final model to
    ``out_dir/final``. With ``resume``, continue from ``out_dir/checkpoint``. ``stop_after`` ends this
    invocation after that many steps (checkpointing), as an interruption would; tests use it."""
    if config.threads:
        torch.set_num_threads(config.threads)
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out / "checkpoint"
    if resume:  # checked first: a bad checkpoint fails before the corpus is read
        model, state, state_tensors = _load_for_resume(ckpt_dir, config)
    corpus = corpus or build_corpus()
    stream = corpus.train_stream
    sampler = BatchSampler(stream, config.seq_len, config.batch_size, config.seed)
    torch.manual_seed(config.seed)

    step, extra = 0, {}
    if resume:
        step, extra = state["step"], dict(state["extra"])
        torch.set_rng_state(state_tensors["rng/torch_cpu"])
    else:
        model = build_model(config)
        if isinstance(model, BLTModel):
            # spread the calibration sample over the stream (code and plays) deterministically
            rng = np.random.default_rng([config.seed, 10**9])
            picks = rng.integers(0, len(stream) - config.seq_len, size=64)
            sample = np.concatenate([stream[p : p + config.seq_len] for p in picks])
            theta = calibrate_threshold(model.entropy_model, sample, config.seq_len, config.target_patch_length)
            model = _with_threshold(model, theta)
            extra["patching_threshold"] = theta
            log(f"patching threshold θ = {theta:.4f} (target mean patch length {config.target_patch_length})")
    model.train()
    if isinstance(model, BLTModel):
        model.entropy_model.eval()
        model.entropy_model.requires_grad_(False)
    named = _trainable_named(model)
    names, params = [n for n, _ in named], [p for _, p in named]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.95), weight_decay=config.weight_decay)
    if resume:
        load_optimizer_state(optimizer, names, state, state_tensors, str(ckpt_dir))
    n_params = sum(p.numel() for p in params)
    log(f"training {config.kind} ({n_params / 1e6:.2f}M trainable parameters), corpus {corpus.version}, "
        f"from step {step} to {config.steps}")

    history_path = out / "log.jsonl"
    bytes_seen = int(extra.get("bytes_seen", 0))
    elapsed_before = float(extra.get("wall_time_s", 0.0))
    started = time.perf_counter()
    loss_value = float("nan")
    bar = tqdm(total=config.steps, initial=step, disable=not progress, dynamic_ncols=True, desc=config.kind)
    last_tick, last_bytes = time.perf_counter(), 0
    stopped_early = False
    first_step = step
    while step < config.steps:
        if stop_after is not None and step - first_step >= stop_after:
            stopped_early = True
            break
        if config.time_budget_s is not None and elapsed_before + time.perf_counter() - started >= config.time_budget_s:
            stopped_early = True
            break
        for group in optimizer.param_groups:
            group["lr"] = lr_at(config, step)
        ids = torch.as_tensor(sampler.batch(step))
        gen = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
            if isinstance(model, BLTModel):
                with torch.no_grad():
                    layout = model.patch_layout(ids)
                # one B per step, cycling through the mix, so that one model serves every B
                block_size = config.block_sizes[step % len(config.block_sizes)]
                blocks = make_blocks(ids, layout, block_size, gen, config.t_min)
                result = diffusion_forward(model, ids, blocks.block_starts, block_size, blocks.noisy, layout)
                clean = next_byte_loss(result.clean_logits, ids)
                diff = diffusion_loss(result.block_logits, blocks.targets, blocks.masked, blocks.t, blocks.valid)
                loss = clean + config.diffusion_weight * diff
                parts = {"clean": float(clean.detach()), "diffusion": float(diff.detach())}
            else:
                loss = next_byte_loss(model(ids), ids)
                parts = {}
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        step += 1
        bytes_seen += ids.numel() - ids.shape[0]
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise TrainingError(f"loss became {loss_value} at step {step}")
        now = time.perf_counter()
        rate = (bytes_seen - last_bytes) / max(now - last_tick, 1e-9) if last_bytes else 0.0
        last_tick, last_bytes = now, bytes_seen
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}", **{k: f"{v:.3f}" for k, v in parts.items()}, bytes_s=f"{rate:.0f}")
        record: dict[str, Any] = {"step": step, "loss": loss_value, **parts, "lr": lr_at(config, step - 1),
                                  "bytes_seen": bytes_seen, "wall_time_s": elapsed_before + now - started}
        if step % config.eval_every == 0 or step == config.steps:
            record["heldout_bpb"] = evaluate(model, corpus, config.eval_bytes, config.seq_len)
            bar.write(f"step {step}: loss {loss_value:.4f}, held-out bits/byte {json.dumps(record['heldout_bpb'])}")
        with history_path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        if step % config.checkpoint_every == 0:
            extra.update(bytes_seen=bytes_seen, wall_time_s=elapsed_before + time.perf_counter() - started)
            _save(model, ckpt_dir, optimizer, names, step, config, extra)
    bar.close()
    wall = elapsed_before + time.perf_counter() - started
    extra.update(bytes_seen=bytes_seen, wall_time_s=wall)
    _save(model, ckpt_dir, optimizer, names, step, config, extra)
    if stopped_early and stop_after is None:
        log(f"time budget of {config.time_budget_s:.0f}s reached at step {step}")
    final_eval = evaluate(model, corpus, config.eval_bytes_final, config.seq_len)
    patch_len = (mean_patch_length(model, corpus.heldout_text("code", config.eval_bytes_final), config.seq_len)
                 if isinstance(model, BLTModel) else None)
    summary = {"corpus": corpus.version, "steps": step, "wall_time_s": wall, "bytes_seen": bytes_seen,
               "final_loss": loss_value, "heldout_bpb": final_eval, "heldout_eval_bytes": config.eval_bytes_final,
               "mean_patch_length_code": patch_len, "trainable_params": n_params, **extra}
    final_dir = out / "final"
    if isinstance(model, BLTModel):
        save_model(model, final_dir, metadata={"training": config.to_dict(), **summary})
    else:
        save_byte_lm(model, final_dir, metadata={"training": config.to_dict(), **summary})
    (out / TRAINING_JSON).write_text(json.dumps({"config": config.to_dict(), **summary}, indent=2) + "\n")
    log(f"done: {step} steps in {wall:.0f}s, held-out bits/byte {json.dumps(final_eval)}"
        + (f", mean patch length on held-out code {patch_len:.2f}" if patch_len else ""))
    return TrainResult(str(out), step, wall, bytes_seen, loss_value, final_eval, patch_len, n_params)


def _with_threshold(model: BLTModel, theta: float) -> BLTModel:
    new = BLTModel(attrs.evolve(model.config, patching_threshold=theta))
    new.load_state_dict(model.state_dict())
    return new
