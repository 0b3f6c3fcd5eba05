"""Every error blt-decode raises on purpose, in one place: the types a caller may catch, each with the
situation it names. Modules raise these; none defines its own (docs/api.md lists them)."""

from __future__ import annotations


class BLTDecodeError(Exception):
    """Base class of blt-decode's errors."""


class ConfigError(BLTDecodeError, ValueError):
    """A model configuration is missing a field or has a value out of range."""


class CheckpointError(BLTDecodeError, ValueError):
    """A checkpoint is corrupt, incomplete, or does not match its configuration."""


class _NamedLookupError(BLTDecodeError, KeyError):
    kind = "name"
    plural = "names"

    def __init__(self, name: str, registered: list[str]):
        self.name = name
        self.registered = sorted(registered)
        super().__init__(name)

    def __str__(self) -> str:  # KeyError would print the repr of the key only
        names = ", ".join(self.registered) or "(none)"
        return f"unknown {self.kind} {self.name!r}; registered {self.plural}: {names}"


class UnknownStrategyError(_NamedLookupError):
    """No decoding strategy is registered under that name."""

    kind = "strategy"
    plural = "strategies"


class UnknownBackendError(_NamedLookupError):
    """No compute backend is registered under that name."""

    kind = "backend"
    plural = "backends"


class UnknownModelError(BLTDecodeError, ValueError):
    """A model spec names neither a directory nor a known preset."""


class DuplicateNameError(BLTDecodeError, ValueError):
    """Two plugins registered the same strategy or backend name."""


class PluginError(BLTDecodeError, ValueError):
    """A plugin marks a function as a hook implementation that no hookspec declares (a misspelled hook
    would otherwise register nothing, silently)."""


class ContractError(BLTDecodeError, TypeError):
    """A plugin registered a strategy or backend that lacks part of its protocol
    (:mod:`blt_decode.decoding.protocol`); the message names what is missing and where the contract is."""


class BackendUnavailableError(BLTDecodeError, RuntimeError):
    """A registered backend cannot run on this machine (the compiled backend on a CPU without a C++
    compiler, say); the message says what is missing and which backend runs instead."""


class InvalidOptionsError(BLTDecodeError, ValueError):
    """Options given to a strategy are unknown or out of range."""


class PromptTooLongError(BLTDecodeError, ValueError):
    """The prompt plus the requested new bytes do not fit the model's maximum sequence length."""


class InvalidRequestError(BLTDecodeError, ValueError):
    """A generation request has a bad field (prompt, max_new_bytes, stop sequences, seed)."""


class StrategyError(BLTDecodeError, RuntimeError):
    """A strategy broke the decoding protocol (committed something that is not token ids, or made no
    progress); the message names the strategy."""


class NonFiniteError(BLTDecodeError, FloatingPointError):
    """A module of the model produced NaN or infinite values; the message names the module."""


class EngineError(BLTDecodeError):
    """The engine cannot take a request (a backend that cannot batch, a bad setting)."""


class EngineStoppedError(EngineError):
    """The engine's background thread is not running, so a waiting request would never end."""


class CancelledError(BLTDecodeError):
    """The request was cancelled before it finished."""


class TrainingError(BLTDecodeError):
    """Training cannot start or resume (bad options, mismatched checkpoint, bad data)."""


class CorpusError(BLTDecodeError):
    """The corpus cannot be built (a source is missing)."""


class JobError(BLTDecodeError):
    """A malformed batch-job input line or output file; the message names the file and the line."""


class PromptSetError(BLTDecodeError):
    """An unknown prompt set, a request for more prompts than a set holds, or a malformed prompt file."""


class CLIError(BLTDecodeError):
    """A command-line argument that the API never sees is wrong (a file, a flag combination)."""


class SandboxError(BLTDecodeError):
    """A sandbox setting out of range, or the sandbox itself could not run a program."""


class HumanEvalError(BLTDecodeError):
    """A bad setting of a HumanEval run, or a results file written by a different run."""


class ChatTemplateError(BLTDecodeError):
    """A chat template that cannot be read or compiled, or messages it cannot render."""


class ChatTemplateBusyError(ChatTemplateError):
    """Every chat-template worker stayed busy for the whole render time limit (the server answers 503)."""


class MissingExtraError(BLTDecodeError, ImportError):
    """A feature needs packages of an optional extra that is not installed; the message says which
    ``pip install -e ".[EXTRA]"`` (in the checkout, as the README installs blt-decode) brings them."""


def install_hint(extra: str) -> str:
    """The command that installs an optional extra, as the README installs blt-decode (from its checkout:
    there is no package index to install it from)."""
    return f'pip install -e ".[{extra}]" in the blt-decode checkout'
