"""Training: the entropy model, the BLT-D model (from scratch or continued from a checkpoint), and a
plain byte-level transformer baseline; one process or many under torchrun. See docs/training.md."""

from blt_decode.training.checkpoints import (
    BYTE_LM_FORMAT,
    LEGACY_TRAINER_STATE,
    TRAINER_STATE,
    TRAINER_TENSORS,
    load_byte_lm,
    read_trainer_state,
    save_byte_lm,
)
from blt_decode.errors import TrainingError
from blt_decode.training.config import TrainConfig
from blt_decode.training.diffusion import DiffusionOutput, block_attention_mask, diffusion_forward
from blt_decode.training.loop import (
    LOG_FILE,
    TRAINING_JSON,
    TrainResult,
    build_model,
    byte_lm_bits_per_byte,
    calibrate_threshold,
    evaluate,
    lr_at,
    mean_patch_length,
    train,
)
from blt_decode.training.objective import (
    NoisyBlocks,
    diffusion_loss,
    diffusion_loss_sum,
    make_blocks,
    next_byte_loss,
    row_generator,
)
from blt_decode.model.presets import (
    BLT_PRESETS,
    BYTELM_PRESETS,
    ENTROPY_PRESETS,
    blt_preset,
    global_share,
)

__all__ = [
    "BLT_PRESETS", "BYTELM_PRESETS", "BYTE_LM_FORMAT", "DiffusionOutput", "ENTROPY_PRESETS", "LEGACY_TRAINER_STATE", "LOG_FILE",
    "NoisyBlocks", "TRAINER_STATE", "TRAINER_TENSORS", "TRAINING_JSON", "TrainConfig", "TrainResult",
    "TrainingError", "block_attention_mask", "blt_preset", "build_model", "byte_lm_bits_per_byte", "calibrate_threshold",
    "diffusion_forward", "diffusion_loss", "diffusion_loss_sum", "evaluate", "global_share", "load_byte_lm", "lr_at", "make_blocks",
    "mean_patch_length", "next_byte_loss", "read_trainer_state", "row_generator", "save_byte_lm", "train",
]
