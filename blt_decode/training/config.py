"""What a training run depends on: :class:`TrainConfig`, every field checked when the config is made (one
:class:`~blt_decode.errors.TrainingError` line naming the option's flag). A field that is a flag of
``blt-decode train`` says so in its metadata (:func:`flag`: the flag's name and help), from which the
command line is generated.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs

from blt_decode.checks import Validators, is_int, max_threads, show, to_float, to_int
from blt_decode.errors import TrainingError
from blt_decode.model.config import MAX_SEQLEN

ModelKind = Literal["entropy", "blt", "bytelm"]
#: options that change how a run executes, not what it computes: --resume accepts new values for them
EXECUTION_OPTIONS = frozenset({"out_dir", "time_budget_s", "threads", "device", "compile", "grad_accum",
                               "activation_checkpointing", "parallel", "prefetch"})

#: the training options' family of checks: "--lr must be ..., got ..." (a field without a flag: its name)
CHECKS = Validators(TrainingError, label=lambda attribute: attribute.metadata.get("flag", attribute.name),
                    optional=" (or unset)")

#: upper bounds of the sizes and counts a run may ask for (a typo is one line, not an allocator error)
MAX_BATCH_SIZE = 1 << 16
MAX_STEPS = 10**9
MAX_EVAL_BYTES = 1 << 32
MAX_BLOCK_SIZE = 4096


def flag(name: str, help: str, **argparse: Any) -> dict[str, Any]:
    """A field's metadata making it the command-line flag ``name`` of ``blt-decode train`` with ``help``
    (the default is added to it); ``argparse``: further ``add_argument`` keywords (``metavar``)."""
    return {"flag": name, "help": help, "argparse": argparse}


def _block_sizes(value: Any) -> tuple[int, ...]:
    # integers of any kind (numpy's too), never a bool or a float that int() would cut
    sizes = tuple(to_int(b) for b in value) if isinstance(value, (list, tuple)) else ()
    if not sizes or len(sizes) > 64 or not all(is_int(b) and 1 <= b <= MAX_BLOCK_SIZE for b in sizes):
        raise TrainingError(f"--block-sizes must be one or more integers in 1..{MAX_BLOCK_SIZE} (at most 64 of them), "
                            f"got {show(value)}")
    return sizes


@attrs.frozen
class TrainConfig:
    """Everything a training run depends on (saved with every checkpoint; ``--resume`` compares it)."""

    kind: ModelKind = attrs.field(validator=CHECKS.choice(("entropy", "blt", "bytelm")))
    out_dir: str = attrs.field(metadata=flag("--out", "run directory (checkpoint/, final/, log.jsonl, training.json)",
                                                 metavar="OUT"))
    preset: str | None = attrs.field(default=None, metadata=flag(
        "--preset", "model shape: a preset name (blt: default, tiny, small, blt-10m, blt-40m, blt-150m, blt-1b; entropy/bytelm: "
                    "default, tiny) or a .json config file (default: default, or the --init shape)"))
    seq_len: int = attrs.field(default=512, validator=CHECKS.integer(8, MAX_SEQLEN),
                               metadata=flag("--seq-len", "bytes per training sequence incl. BOS"))
    batch_size: int = attrs.field(default=8, validator=CHECKS.integer(1, MAX_BATCH_SIZE), metadata=flag(
        "--batch-size", "sequences per optimizer step over all processes and micro-batches (the global batch)"))
    steps: int = attrs.field(default=1000, validator=CHECKS.integer(1, MAX_STEPS),
                             metadata=flag("--steps", "optimizer steps; the LR schedule spans them"))
    lr: float = attrs.field(default=2e-3, converter=to_float, validator=CHECKS.number(0, low_open=True),
                            metadata=flag("--lr", "peak learning rate (AdamW, cosine decay)"))
    #: the cosine schedule ends at this share of the peak learning rate
    min_lr_ratio: float = attrs.field(default=0.1, converter=to_float, validator=CHECKS.number(0, 1))
    warmup_steps: int = attrs.field(default=100, validator=CHECKS.integer(0, MAX_STEPS),
                                    metadata=flag("--warmup-steps", "linear warm-up steps"))
    weight_decay: float = attrs.field(default=0.01, converter=to_float, validator=CHECKS.number(0))
    grad_clip: float = attrs.field(default=1.0, converter=to_float, validator=CHECKS.number(0, low_open=True))
    seed: int = attrs.field(default=0, validator=CHECKS.integer(0, 2**63 - 1),
                            metadata=flag("--seed", "seed for weights, batches and masking"))
    time_budget_s: float | None = attrs.field(default=None, converter=to_float, validator=CHECKS.number(0, optional=True),
                                              metadata=flag("--time-budget", "stop after this much training time, "
                                                            "checkpoint, and evaluate", metavar="SECONDS"))
    eval_every: int = attrs.field(default=200, validator=CHECKS.integer(1, MAX_STEPS),
                                  metadata=flag("--eval-every", "held-out bits-per-byte every N steps"))
    eval_bytes: int = attrs.field(default=16384, validator=CHECKS.integer(1, MAX_EVAL_BYTES),
                                  metadata=flag("--eval-bytes", "held-out bytes per kind for periodic evals"))
    eval_bytes_final: int = attrs.field(default=131072, validator=CHECKS.integer(1, MAX_EVAL_BYTES),
                                        metadata=flag("--eval-bytes-final", "held-out bytes per kind for the final eval"))
    checkpoint_every: int = attrs.field(default=200, validator=CHECKS.integer(1, MAX_STEPS),
                                        metadata=flag("--checkpoint-every", "checkpoint every N steps"))
    bf16: bool | None = attrs.field(default=None, validator=CHECKS.flag(optional=True), metadata=flag(
        "--bf16", "bfloat16 autocast, float32 master weights (default: on for cuda and for CPUs with native bfloat16 "
                  "instructions, amx_bf16 or avx512_bf16; off elsewhere, where it is slower; training/precision.py)"))
    threads: int | None = attrs.field(default=None, validator=CHECKS.integer(0, max_threads(), optional=True),
                                      metadata=flag("--threads", "torch CPU threads, at most the CPU count "
                                                                 "(default: torch's choice)"))
    # -- data ------------------------------------------------------------------------------------
    data: tuple[str, ...] = attrs.field(default=("builtin",), converter=tuple, metadata=flag(
        "--data", "training data: files, directories, .jsonl[.gz] files (text field), `corpus build` directories, "
                  "or builtin, stdlib, plays", metavar="SPEC"))
    include: tuple[str, ...] = attrs.field(default=(), converter=tuple, metadata=flag(
        "--include", "file-name patterns for directories in --data, e.g. '*.py' (default: every text file)",
        metavar="PATTERN"))
    heldout_fraction: float = attrs.field(default=0.01, converter=to_float, validator=CHECKS.number(0, 1, high_open=True),
                                          metadata=flag("--heldout-fraction", "share of user documents held out for "
                                                        "evaluation (by name hash)"))
    synthetic_data: bool = attrs.field(default=False, validator=CHECKS.flag(), metadata=flag(
        "--synthetic-data", "train on 64 batches made in memory before the clock starts (step s uses batch s mod 64): "
                            "the same compute without the data pipeline, to measure what it costs; not for real runs"))
    # -- execution -----------------------------------------------------------------------------
    device: str = attrs.field(default="cpu", validator=CHECKS.choice(("cpu", "cuda")),
                              metadata=flag("--device", "where to train", choices=("cpu", "cuda")))
    compile: bool = attrs.field(default=False, validator=CHECKS.flag(), metadata=flag(
        "--compile", "torch.compile the training step's transformer layers (docs/training.md: when it pays)"))
    grad_accum: int = attrs.field(default=1, validator=CHECKS.integer(1, MAX_BATCH_SIZE), metadata=flag(
        "--grad-accum", "micro-batches per process per step; --batch-size must divide by processes x N", metavar="N"))
    activation_checkpointing: bool = attrs.field(default=False, validator=CHECKS.flag(), metadata=flag(
        "--activation-checkpointing", "recompute layer activations in the backward pass (less memory, ~1/3 more compute)"))
    parallel: str = attrs.field(default="ddp", validator=CHECKS.choice(("ddp", "fsdp")), metadata=flag(
        "--parallel", "under torchrun: ddp (replicas) or fsdp (sharded weights and optimizer state)",
        choices=("ddp", "fsdp")))
    prefetch: int = attrs.field(default=2, validator=CHECKS.integer(0, 1024),
                                metadata=flag("--prefetch", "batches prepared ahead by the loader thread"))
    # -- BLT-D only ------------------------------------------------------------------------------
    entropy_model: str | None = attrs.field(default=None, metadata=flag(
        "--entropy-model", "trained entropy model directory (byte-LM checkpoint; kind blt from scratch)"))
    init: str | None = attrs.field(default=None, metadata=flag(
        "--init", "continue training this checkpoint (native, Hugging Face or original layout for blt; its entropy "
                  "model and patching are kept; a byte LM for entropy/bytelm)", metavar="DIR"))
    block_sizes: tuple[int, ...] = attrs.field(default=(4, 8, 16), converter=_block_sizes, metadata=flag(
        "--block-sizes", "diffusion block sizes B, cycled per step (kind blt only)", metavar="B"))
    #: the smallest diffusion time; avoids 1/t blowing up (t ~ U(t_min, 1))
    t_min: float = attrs.field(default=1e-3, converter=to_float, validator=CHECKS.number(0, 1, low_open=True, high_open=True))
    #: (> 1: the calibration takes the 1 - 1/target quantile of the entropies)
    target_patch_length: float = attrs.field(default=4.5, converter=to_float, validator=CHECKS.number(1, low_open=True),
                                             metadata=flag("--target-patch-length", "theta is calibrated so patches "
                                                           "average this many bytes (kind blt from scratch only)"))
    diffusion_weight: float = attrs.field(default=1.0, converter=to_float, validator=CHECKS.number(0))

    def __attrs_post_init__(self) -> None:
        # an option that does not apply would be silently ignored: refuse it, naming it
        defaults = {f.name: f.default for f in attrs.fields(TrainConfig)}
        given = [f.metadata.get("flag", f.name) for f in attrs.fields(TrainConfig)
                 if f.name in BLT_ONLY_OPTIONS and getattr(self, f.name) != defaults[f.name]]
        if self.kind != "blt" and given:
            raise TrainingError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} only to `train blt` "
                                f"(the BLT-D objective); drop {'it' if len(given) == 1 else 'them'} for `train {self.kind}`")
        if self.init is not None and self.target_patch_length != defaults["target_patch_length"]:
            raise TrainingError("--target-patch-length calibrates the patching of a BLT trained from scratch; "
                                "--init keeps the checkpoint's patching: drop --target-patch-length")

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


#: options of the BLT-D objective and of a BLT from scratch
BLT_ONLY_OPTIONS = frozenset({"entropy_model", "block_sizes", "t_min", "target_patch_length", "diffusion_weight"})
