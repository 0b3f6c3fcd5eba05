"""The training loop: from scratch, from a released checkpoint, on your data; one process or many under
torchrun. The recipe (entropy model, BLT-D objective, byte-LM baseline) and why runs resume exactly in
any process layout are in docs/training.md; what a run depends on is :class:`TrainConfig`.
"""

from __future__ import annotations

import contextlib
import json
import math
import stat
import time
from pathlib import Path
from typing import Any, Callable

import attrs
import numpy as np
import torch
import torch.utils.checkpoint
from torch import nn
from tqdm import tqdm

from blt_decode.checkpoints.native import load_native
from blt_decode.checks import file_kind, is_int, loads_json, show
from blt_decode.errors import TrainingError
from blt_decode.model import tokenizer
from blt_decode.model.blt import BLTModel, EntropyModel, init_weights
from blt_decode.model.tokenizer import VOCAB_SIZE
from blt_decode.tools.corpus import BatchSampler, Corpus
from blt_decode.training import distributed
from blt_decode.training.config import EXECUTION_OPTIONS, MAX_STEPS, TrainConfig
from blt_decode.training.checkpoints import (
    config_of,
    find_checkpoint,
    load_byte_lm,
    optimizer_state_from_files,
    read_trainer_state,
    save_any,
    trainer_state_files,
    write_checkpoint,
)
from blt_decode.model.presets import blt_preset, stack_preset
from blt_decode.training.data import CODE_KINDS, BatchLoader, load_data
from blt_decode.training.diffusion import diffusion_forward
from blt_decode.training.objective import diffusion_loss_sum, make_blocks, next_byte_loss, row_generator
from blt_decode.training.precision import resolve_bf16

TRAINING_JSON = "training.json"
LOG_FILE = "log.jsonl"


# -- evaluation --------------------------------------------------------------------------------------
@torch.no_grad()
def byte_lm_bits_per_byte(module: EntropyModel, data: bytes, chunk_bytes: int) -> float:
    """Bits per byte of ``data`` under a byte LM, chunked exactly like :func:`blt_decode.score`
    (every chunk a fresh sequence starting with BOS)."""
    total, count = 0.0, 0
    device = next(module.parameters()).device
    for lo in range(0, len(data), chunk_bytes):
        ids = torch.tensor([tokenizer.encode(data[lo : lo + chunk_bytes])], device=device)
        logp = torch.log_softmax(module(ids).double(), dim=-1)[0, :-1]
        total -= float(logp.gather(-1, ids[0, 1:, None]).sum())
        count += ids.shape[1] - 1
    return total / math.log(2) / count


def evaluate(model: BLTModel | EntropyModel, corpus: Corpus, max_bytes: int | None, chunk_bytes: int) -> dict[str, float]:
    """Held-out bits-per-byte for every kind of held-out document (``blt_decode.score`` for a BLT)."""
    from blt_decode.api import score

    out = {}
    was_training = model.training
    model.eval()
    kinds = list(dict.fromkeys(d.kind for d in corpus.heldout))
    for kind in kinds:
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
        ids = torch.tensor([tokenizer.encode(data[lo : lo + chunk_bytes])], device=model.device)
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
    device = next(entropy_model.parameters()).device
    ent = torch.cat([_entropy(entropy_model(ids[i : i + 8].to(device))).cpu() for i in range(0, rows, 8)])
    return float(torch.quantile(ent[:, 1:].flatten().double(), 1.0 - 1.0 / target))


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.double(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def lr_at(config: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` of the peak at ``steps``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@attrs.frozen
class TrainResult:
    """What :func:`train` returns: the output directory, steps, time, bytes seen, final loss, held-out bits
    per byte by kind (rank 0 only), mean patch length on held-out code (None where not measured), parameters."""

    out_dir: str
    steps: int
    wall_time_s: float
    bytes_seen: int
    final_loss: float
    heldout_bpb: dict[str, float]
    mean_patch_length_code: float | None
    params: int
    #: training bytes per second of this invocation (all processes together)
    bytes_per_s: float = 0.0


# -- models ------------------------------------------------------------------------------------------
def _init_stack(module: nn.Module, gen: torch.Generator) -> nn.Module:
    # BLT's initialisation scheme on a stand-alone stack
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
                std = m.weight.shape[-1] ** -0.5
                m.weight.copy_(torch.nn.init.trunc_normal_(torch.empty_like(m.weight), std=std, a=-3 * std, b=3 * std, generator=gen))
    return module


def load_init(config: TrainConfig) -> BLTModel | EntropyModel:
    """The ``--init`` checkpoint as a float32 model: for a BLT any layout :func:`blt_decode.load_model`
    reads (native, Hugging Face, original), entropy model and patching kept; a byte LM otherwise."""
    from blt_decode.api import load_model

    assert config.init is not None
    if not Path(config.init).is_dir():
        raise TrainingError(f"--init {config.init}: not a checkpoint directory")
    if config.kind != "blt":
        return load_byte_lm(config.init)
    model = load_model(config.init, dtype=torch.float32)
    if model.config.max_seqlen < config.seq_len:
        raise TrainingError(f"--seq-len {config.seq_len} exceeds the checkpoint's max_seqlen {model.config.max_seqlen}")
    return model


def build_model(config: TrainConfig) -> BLTModel | EntropyModel:
    """The model a run starts from: ``--init``'s checkpoint, or a seeded random model of the preset."""
    if config.init is not None:
        if config.preset is not None:
            raise TrainingError("--init takes the model's shape from the checkpoint: drop --preset")
        if config.entropy_model is not None:
            raise TrainingError("--init keeps the checkpoint's entropy model and patching: drop --entropy-model")
        return load_init(config)
    preset = config.preset or "default"
    gen = torch.Generator().manual_seed(config.seed)
    if config.kind == "blt":
        shape = blt_preset(preset)
        if config.entropy_model is None:
            raise TrainingError("training a BLT from scratch needs a trained entropy model (--entropy-model DIR); "
                                "to continue a released or converted BLT use --init DIR")
        entropy = load_byte_lm(config.entropy_model)
        cfg = attrs.evolve(shape, entropy_model=entropy.cfg, max_seqlen=max(shape.max_seqlen, config.seq_len))
        model = init_weights(BLTModel(cfg), gen)
        model.entropy_model.load_state_dict(entropy.state_dict())
        return model
    return _init_stack(EntropyModel(stack_preset(config.kind, preset), VOCAB_SIZE), gen)


def _trainable_named(model: BLTModel | EntropyModel) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of what the optimizer trains: all but the frozen entropy model of a BLT."""
    if isinstance(model, BLTModel):
        # the entropy model is trained first and frozen
        return [(name, p) for name, p in model.named_parameters() if not name.startswith("entropy_model.")]
    return list(model.named_parameters())


def _with_threshold(model: BLTModel, theta: float) -> BLTModel:
    new = BLTModel(attrs.evolve(model.config, patching_threshold=theta))
    new.load_state_dict(model.state_dict())
    return new


def _stacks(model: BLTModel | EntropyModel) -> list[nn.Module]:
    """The transformer stacks whose layers run through their own forward (checkpointing, compile)."""
    if isinstance(model, BLTModel):
        return [model.local_encoder, model.global_transformer]
    return [model]


def _checkpoint_layer(layer: nn.Module) -> None:
    # replace the instance's forward (parameter names unchanged) by one that recomputes in backward
    forward = layer.forward

    def recomputed(*args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    layer.forward = recomputed


def _compile_layers(model: BLTModel | EntropyModel) -> None:
    # Module.compile keeps parameter names (checkpoints stay loadable). The patch-layout bookkeeping
    # of the BLT-D forward is data-dependent Python and stays eager; the layers are the compute (the
    # decoder's layers are compiled by diffusion_forward itself, compile_decoder=True).
    for stack in _stacks(model):
        for layer in stack.layers:
            layer.compile(dynamic=True)


class TrainStep(nn.Module):
    """One micro-batch's loss terms, as a module so that DDP/FSDP hooks see the forward pass."""

    def __init__(self, model: BLTModel | EntropyModel, checkpoint_decoder: bool = False, compile_decoder: bool = False):
        super().__init__()
        self.model = model
        self.checkpoint_decoder = checkpoint_decoder
        self.compile_decoder = compile_decoder

    def forward(self, ids: torch.Tensor, layout: Any = None, blocks: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean next-byte loss, Σ masked-block cross-entropy / t) of the micro-batch."""
        if isinstance(self.model, BLTModel):
            result = diffusion_forward(self.model, ids, blocks.block_starts, blocks.block_size, blocks.noisy, layout,
                                       checkpoint_decoder=self.checkpoint_decoder, compile_decoder=self.compile_decoder)
            clean = next_byte_loss(result.clean_logits, ids)
            return clean, diffusion_loss_sum(result.block_logits, blocks.targets, blocks.masked, blocks.t)
        clean = next_byte_loss(self.model(ids), ids)
        return clean, clean.new_zeros(())


def _eval_copy(model: BLTModel | EntropyModel, state: dict[str, torch.Tensor]) -> BLTModel | EntropyModel:
    """A plain CPU model holding ``state`` (evaluation of a sharded or compiled model)."""
    cfg = config_of(model)
    copy = BLTModel(cfg) if isinstance(model, BLTModel) else EntropyModel(cfg, VOCAB_SIZE)
    copy.load_state_dict(state)
    return copy.eval()


def _check_corpus(saved: str | None, corpus: Corpus, source: str, say: Callable[[str], None]) -> None:
    # the checkpoint's step is a position in *its* corpus's batch sequence: on other data (another
    # version of the files, another Python's stdlib) the same step means other batches and other
    # held-out sets, so the run would silently stop being the run it claims to continue
    if saved is None:
        # written before the corpus was recorded (trainer state without "corpus"): accepted, since
        # refusing would strand every such run, but it cannot be checked
        say(f"note: {source} does not record its corpus (an older checkpoint); resuming on corpus {corpus.version} "
            f"without checking that it is the one the run started on")
        return
    if saved != corpus.version:
        raise TrainingError(f"cannot resume: the training data is not the checkpoint's (checkpoint corpus "
                            f"{_shorten(saved)}, now {_shorten(corpus.version)}); its step would index other "
                            f"batches: restore that data or start a new run")


def _shorten(version: str, limit: int = 90) -> str:
    # a built code corpus's version names every distribution; its end (the content digest) tells them apart
    return version if len(version) <= limit else f"{version[:50]}...{version[-30:]}"


def _check_resume(saved: dict[str, Any], config: TrainConfig) -> None:
    mine = config.to_dict()

    def norm(v: Any) -> Any:
        return list(v) if isinstance(v, (tuple, list)) else v

    differ = sorted(k for k in mine if k not in EXECUTION_OPTIONS and norm(mine[k]) != norm(saved.get(k)))
    if differ:
        raise TrainingError(f"cannot resume: options differ from the checkpoint's: {', '.join(differ)}")


# -- the loop ----------------------------------------------------------------------------------------
def check_run_directory(out: Path, resume: bool) -> None:
    """A new run (no ``resume``) must not overwrite another run's checkpoints and log: refuse a directory
    that holds one, naming ``--resume`` and a new directory."""
    if resume or not out.is_dir():
        return
    found = [name for name in ("checkpoint", "checkpoint.tmp", "checkpoint.old", "final", LOG_FILE, TRAINING_JSON)
             if (out / name).exists()]
    if found:
        raise TrainingError(f"{out} already holds a training run ({', '.join(found)}); continue it with --resume, "
                            f"or give --out a new directory")


#: the longest line of log.jsonl kept on resume (a step's record is a few hundred bytes)
MAX_LOG_LINE_BYTES = 1 << 20


def _trim_log(path: Path, step: int) -> None:
    """Drop the log's records of steps after ``step`` (the checkpoint a run resumes from): those steps run
    again and are logged again, once. A torn last line (a kill while writing) goes too."""
    if not path.exists():
        return
    mode = path.stat().st_mode
    if not stat.S_ISREG(mode):  # a device or a pipe there would be read without end
        raise TrainingError(f"{path} is {file_kind(mode)}, not a regular file: the run's log must be a file")
    kept = []
    with path.open("rb") as fh:
        while raw := fh.readline(MAX_LOG_LINE_BYTES + 1):
            if len(raw) > MAX_LOG_LINE_BYTES:  # not a record this loop wrote: skip to the line's end
                while raw and not raw.endswith(b"\n"):
                    raw = fh.readline(MAX_LOG_LINE_BYTES + 1)
                continue
            try:
                record = loads_json(raw)
            except ValueError:  # a torn line, or not JSON at all (nested too deeply, say): dropped as torn
                continue
            if isinstance(record, dict) and is_int(record.get("step")) and record["step"] <= step:
                kept.append(raw.rstrip(b"\n") + b"\n")
    path.write_bytes(b"".join(kept))


def train(config: TrainConfig, *, corpus: Corpus | None = None, resume: bool = False,
          progress: bool = True, log: Callable[[str], None] = print, stop_after: int | None = None) -> TrainResult:
    """Train one model as ``config`` says; checkpoints go to ``out_dir/checkpoint`` and the final model to
    ``out_dir/final``. With ``resume``, continue from ``out_dir/checkpoint``. ``stop_after`` ends this
    invocation after that many steps (checkpointing), as an interruption would; tests use it.

    Under ``torchrun`` every process calls this; rank 0 alone writes files, logs and shows progress."""
    if stop_after is not None and (not is_int(stop_after) or not 1 <= stop_after <= MAX_STEPS):
        raise TrainingError(f"--stop-after must be an integer in 1..{MAX_STEPS} (or unset), got {show(stop_after)}")
    check_run_directory(Path(config.out_dir), resume)
    world = distributed.setup(config.device)
    try:
        return _train(config, world, corpus, resume, progress, log, stop_after)
    finally:
        distributed.teardown(world)


def _train(config: TrainConfig, world: distributed.World, corpus: Corpus | None, resume: bool, progress: bool,
           log: Callable[[str], None], stop_after: int | None) -> TrainResult:
    if config.threads:
        torch.set_num_threads(config.threads)
    main = world.is_main
    say = log if main else (lambda message: None)
    per_process, rem = divmod(config.batch_size, world.size * config.grad_accum)
    if rem or per_process == 0:
        raise TrainingError(f"--batch-size {config.batch_size} (the global batch) must be a multiple of "
                            f"processes x --grad-accum = {world.size} x {config.grad_accum}")
    micro = per_process
    rows_here = slice(world.rank * micro * config.grad_accum, (world.rank + 1) * micro * config.grad_accum)
    out = Path(config.out_dir)
    ckpt_dir = out / "checkpoint"
    if main:
        out.mkdir(parents=True, exist_ok=True)

    if resume:  # checked first: a bad checkpoint fails before the corpus is read
        source, note = find_checkpoint(ckpt_dir)
        if note:
            say(note)
        state_json, state_tensors = read_trainer_state(source)
        _check_resume(dict(state_json["config"]), config)
        model: BLTModel | EntropyModel = load_native(source) if config.kind == "blt" else load_byte_lm(source)
    else:
        model = build_model(config)
    corpus = corpus or load_data(config.data, config.include, config.heldout_fraction)
    stream = corpus.train_stream
    sampler = BatchSampler(stream, config.seq_len, config.batch_size, config.seed)
    torch.manual_seed(config.seed)

    step, extra = 0, {}
    if resume:
        _check_corpus(state_json.get("corpus"), corpus, str(source), say)
        step, extra = state_json["step"], dict(state_json["extra"])  # types checked by read_trainer_state
        try:
            torch.set_rng_state(state_tensors["rng/torch_cpu"])
        except (RuntimeError, ValueError) as exc:  # bytes of the wrong length
            raise TrainingError(f"{source}: 'rng/torch_cpu' is not a CPU random state ({str(exc).splitlines()[0]})") from None
    elif isinstance(model, BLTModel) and config.init is None and model.patcher.uses_entropy:
        # spread the calibration sample over the stream deterministically
        rng = np.random.default_rng([config.seed, 10**9])
        picks = rng.integers(0, len(stream) - config.seq_len, size=64)
        sample = np.concatenate([stream[p : p + config.seq_len] for p in picks])
        theta = calibrate_threshold(model.entropy_model, sample, config.seq_len, config.target_patch_length)
        theta = float(distributed.broadcast_object(theta, world))
        model = _with_threshold(model, theta)
        extra["patching_threshold"] = theta
        say(f"patching threshold θ = {theta:.4f} (target mean patch length {config.target_patch_length})")
    elif config.init is not None:
        extra["init"] = str(config.init)
        if isinstance(model, BLTModel):
            extra["patching_threshold"] = model.config.patching_threshold

    is_blt = isinstance(model, BLTModel)
    model = model.to(world.device)
    model.train()
    if is_blt and model.entropy_model is not None:
        model.entropy_model.eval()
        model.entropy_model.requires_grad_(False)
    if config.activation_checkpointing:
        for stack in _stacks(model):
            for layer in stack.layers:
                _checkpoint_layer(layer)
    if config.compile:
        _compile_layers(model)
    named = _trainable_named(model)
    names = [n for n, _ in named]
    step_module = TrainStep(model, checkpoint_decoder=config.activation_checkpointing and is_blt,
                            compile_decoder=config.compile and is_blt)
    frozen = list(model.entropy_model.parameters()) if is_blt and model.entropy_model is not None else []
    global_layers = list(model.global_transformer.layers) if is_blt else list(model.layers)
    wrapped = distributed.wrap(step_module, config.parallel, world, global_layers, frozen)
    sharded = world.distributed and config.parallel == "fsdp"
    params = [p for _, p in _trainable_named(model)]  # after wrapping: FSDP replaces them by sharded ones
    # the fused kernel is one pass over all parameters instead of a dozen (3.5x faster on this CPU); the
    # sharded DTensors of FSDP take the default implementation
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.95), weight_decay=config.weight_decay,
                                  fused=not sharded)
    if resume:
        full = optimizer_state_from_files(names, state_json, state_tensors, str(source))
        if sharded:
            full["state"] = distributed.shard_like(full["state"], params)
        optimizer.load_state_dict(full)
    n_params = sum(math.prod(p.shape) for p in params)
    bf16, precision = resolve_bf16(config.bf16, world.device)
    say(precision)
    say(f"training {config.kind} ({n_params / 1e6:.2f}M trainable parameters) on {world.size} x {world.device.type}"
        f"{' (' + config.parallel + ')' if world.distributed else ''}, corpus {corpus.version}, "
        f"from step {step} to {config.steps}")

    def gather_state() -> dict[str, torch.Tensor] | None:
        # collective under FSDP: every process gathers, rank 0 keeps the result
        if sharded:
            state = distributed.full_state(model.state_dict())
            return state if main else None
        return {k: v.detach().cpu() for k, v in model.state_dict().items()} if main else None

    def eval_model(state: dict[str, torch.Tensor] | None) -> BLTModel | EntropyModel:
        assert state is not None
        return _eval_copy(model, state) if (sharded or config.compile or world.device.type != "cpu") else model

    def save_checkpoint(step_now: int) -> None:
        state = gather_state()
        opt_state = distributed.full_optimizer_state(optimizer) if sharded else optimizer.state_dict()
        if main:
            extra.update(bytes_seen=bytes_seen, wall_time_s=elapsed_before + time.perf_counter() - started)
            payload, tensors = trainer_state_files(opt_state, names, step_now, config.to_dict(), extra, corpus.version)
            write_checkpoint(model, ckpt_dir, metadata={"training": config.to_dict(), "step": step_now, **extra},
                             trainer_json=payload, trainer_tensors=tensors, state=state)
        distributed.barrier(world)

    history_path = out / LOG_FILE
    if resume and main:
        _trim_log(history_path, step)
    bytes_seen = int(extra.get("bytes_seen", 0))
    elapsed_before = float(extra.get("wall_time_s", 0.0))
    bytes_at_start = bytes_seen
    started = time.perf_counter()
    loss_value = float("nan")
    bar = tqdm(total=config.steps, initial=step, disable=not (progress and main), dynamic_ncols=True, desc=config.kind)
    last_tick, last_bytes = time.perf_counter(), 0
    stopped_early = False
    first_step = step
    autocast = torch.autocast(world.device.type, dtype=torch.bfloat16, enabled=bf16)
    end = config.steps if stop_after is None else min(config.steps, first_step + stop_after)
    loader = BatchLoader(sampler, rows_here, world.device, step, end, prefetch=config.prefetch,
                         synthetic=config.synthetic_data)
    step_bytes = config.batch_size * (config.seq_len - 1)
    try:
        for step_index, batch in loader:
            if config.time_budget_s is not None:
                over = float(elapsed_before + time.perf_counter() - started >= config.time_budget_s)
                if float(distributed.all_sum(torch.tensor([over]), world)) > 0:  # every process stops together
                    stopped_early = True
                    break
            for group in optimizer.param_groups:
                group["lr"] = lr_at(config, step_index)
            # 1. layouts and corruptions of every micro-batch first: the diffusion loss is normalised by
            #    the valid block positions of the whole global batch, summed over processes
            chunks = []
            count = 0
            block_size = config.block_sizes[step_index % len(config.block_sizes)]  # one B per step, cycling
            for m in range(config.grad_accum):
                ids = batch[m * micro : (m + 1) * micro]
                if is_blt:
                    # patching in the model's own precision, as decoding patches (never under autocast:
                    # bfloat16 entropies would move boundaries near θ)
                    with torch.no_grad():
                        layout = model.patch_layout(ids)
                    first_row = rows_here.start + m * micro
                    gens = [row_generator(config.seed, step_index, first_row + r) for r in range(micro)]
                    blocks = make_blocks(ids, layout, block_size, gens, config.t_min)
                    count += int(blocks.valid.sum())
                    chunks.append((ids, layout, blocks))
                else:
                    chunks.append((ids, None, None))
            total_count = float(distributed.all_sum(torch.tensor([float(count)]), world)) if is_blt else 1.0
            # 2. forward and backward per micro-batch; terms weighted so that their sum over micro-batches
            #    and processes is the global batch's loss (DDP and FSDP average gradients: x world size)
            parts = torch.zeros(2, dtype=torch.float64)
            optimizer.zero_grad(set_to_none=True)
            for m, (ids, layout, blocks) in enumerate(chunks):
                last = m == len(chunks) - 1
                sync = contextlib.nullcontext() if last or not hasattr(wrapped, "no_sync") else wrapped.no_sync()
                with sync:
                    with autocast:
                        clean, diff_sum = wrapped(ids, layout, blocks)
                    clean_term = clean * (micro / config.batch_size)
                    diff_term = config.diffusion_weight * diff_sum / max(total_count, 1.0)
                    ((clean_term + diff_term) * world.size).backward()
                parts += torch.stack([clean_term.detach().double().cpu(), diff_term.detach().double().cpu()])
            parts = distributed.all_sum(parts, world)
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            step = step_index + 1
            bytes_seen += step_bytes
            loss_value = float(parts.sum())
            if not math.isfinite(loss_value):
                raise TrainingError(f"loss became {loss_value} at step {step}")
            record: dict[str, Any] = {"step": step, "loss": loss_value}
            if is_blt:
                record.update(clean=float(parts[0]), diffusion=float(parts[1]))
            now = time.perf_counter()
            rate = (bytes_seen - last_bytes) / max(now - last_tick, 1e-9) if last_bytes else 0.0
            last_tick, last_bytes = now, bytes_seen
            record.update(lr=lr_at(config, step - 1), bytes_seen=bytes_seen, wall_time_s=elapsed_before + now - started)
            if step % config.eval_every == 0 or step == config.steps:
                state = gather_state() if (sharded or config.compile or world.device.type != "cpu") else {}
                if main:
                    record["heldout_bpb"] = evaluate(eval_model(state), corpus, config.eval_bytes, config.seq_len)
                    bar.write(f"step {step}: loss {loss_value:.4f}, held-out bits/byte {json.dumps(record['heldout_bpb'])}")
                distributed.barrier(world)
            if main:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.3f}", **{k: f"{record[k]:.3f}" for k in ("clean", "diffusion") if k in record},
                                bytes_s=f"{rate:.0f}")
                with history_path.open("a") as fh:
                    fh.write(json.dumps(record) + "\n")
            if step % config.checkpoint_every == 0:
                save_checkpoint(step)
    finally:
        loader.close()
        bar.close()
    if stop_after is not None and step < config.steps:
        stopped_early = True
    wall = elapsed_before + time.perf_counter() - started
    this_run = time.perf_counter() - started
    save_checkpoint(step)
    if stopped_early and stop_after is None:
        say(f"time budget of {config.time_budget_s:.0f}s reached at step {step}")
    state = gather_state()
    final_eval: dict[str, float] = {}
    patch_len = None
    if main:
        final_model = eval_model(state) if state is not None else model
        final_eval = evaluate(final_model, corpus, config.eval_bytes_final, config.seq_len)
        held_kinds = {d.kind for d in corpus.heldout}
        code_kind = next((kind for kind in CODE_KINDS if kind in held_kinds), None)
        if isinstance(final_model, BLTModel) and code_kind is not None:
            patch_len = mean_patch_length(final_model, corpus.heldout_text(code_kind, config.eval_bytes_final),
                                          config.seq_len)
        rate = (bytes_seen - bytes_at_start) / max(this_run, 1e-9)
        summary = {"corpus": corpus.version, "steps": step, "wall_time_s": wall, "bytes_seen": bytes_seen,
                   "bytes_per_s": rate, "processes": world.size, "device": world.device.type,
                   "final_loss": loss_value, "heldout_bpb": final_eval, "heldout_eval_bytes": config.eval_bytes_final,
                   "mean_patch_length_code": patch_len, "trainable_params": n_params, **extra}
        save_any(model, out / "final", {"training": config.to_dict(), **summary}, state)
        (out / TRAINING_JSON).write_text(json.dumps({"config": config.to_dict(), **summary}, indent=2) + "\n")
        say(f"done: {step} steps in {wall:.0f}s ({rate:.0f} training bytes/s), held-out bits/byte {json.dumps(final_eval)}"
            + (f", mean patch length on held-out code {patch_len:.2f}" if patch_len else ""))
    distributed.barrier(world)
    return TrainResult(str(out), step, wall, bytes_seen, loss_value, final_eval, patch_len, n_params,
                       (bytes_seen - bytes_at_start) / max(this_run, 1e-9))

