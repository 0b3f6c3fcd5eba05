"""blt-decode: fast decoding of Byte Latent Transformers.

Decoding strategies (autoregressive, BLT-S, BLT-D, BLT-DV, and yours) are pluggy plugins over swappable
compute backends. Start with :func:`generate`.
"""

from blt_decode.api import (Generation, Score, Stream, generate, generate_many, load_model, random_model, score,
                            score_many, stream)
from blt_decode.checkpoints.native import save_model
from blt_decode.engine.core import Engine, EngineStats, EngineStream
from blt_decode.model.config import BLTConfig, TransformerConfig
from blt_decode.model.stacks import Stack
from blt_decode.errors import (
    BackendUnavailableError,
    BLTDecodeError,
    CancelledError,
    CheckpointError,
    ConfigError,
    ContractError,
    CorpusError,
    DuplicateNameError,
    EngineError,
    InvalidOptionsError,
    InvalidRequestError,
    JobError,
    MissingExtraError,
    NonFiniteError,
    PluginError,
    PromptSetError,
    PromptTooLongError,
    StrategyError,
    TrainingError,
    UnknownBackendError,
    UnknownModelError,
    UnknownStrategyError,
)
from blt_decode.decoding.protocol import DecodeContext
from blt_decode.decoding.session import DecodeSession
from blt_decode.decoding.stats import DecodeStats, ForwardPasses
from blt_decode.engine.request import Request
from blt_decode.model.blt import BLTModel
from blt_decode.plugins.hookspecs import hookimpl
from blt_decode.plugins.registry import backend_names, strategy_names

__version__ = "0.1.0"

__all__ = [
    "BLTConfig", "BLTDecodeError", "BLTModel", "CancelledError", "CheckpointError", "ConfigError", "CorpusError",
    "DecodeContext", "DecodeSession", "DecodeStats", "DuplicateNameError", "PluginError", "ContractError", "BackendUnavailableError", "Engine", "EngineError", "EngineStats",
    "EngineStream", "ForwardPasses", "Generation", "InvalidOptionsError", "InvalidRequestError", "JobError",
    "MissingExtraError", "NonFiniteError", "PromptSetError", "PromptTooLongError", "Request", "Score", "Stack", "Stream",
    "StrategyError", "TrainingError", "TransformerConfig", "UnknownBackendError", "UnknownModelError", "UnknownStrategyError",
    "backend_names", "generate", "generate_many", "hookimpl", "load_model", "random_model", "save_model", "score",
    "score_many",
    "strategy_names", "stream",
]
