"""The public API: load a model, generate, stream, score."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import attrs
import numpy as np
import torch

from blt_decode import plugins, tokenizer
from blt_decode.checkpoint import is_native_checkpoint, load_native
from blt_decode.config import PRESETS, BLTConfig
from blt_decode.errors import PromptTooLongError, UnknownModelError
from blt_decode.formats import load_checkpoint
from blt_decode.model import BLTModel, init_weights
from blt_decode.protocol import DecodeContext
from blt_decode.stats import DecodeStats
from blt_decode.trace import Committed, Trace

DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"
#: extra session room beyond prompt + max_new_bytes, for strategies' scratch positions
DEFAULT_MAX_NEW_BYTES = 256

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
    config = PRESETS[preset] if isinstance(preset, str) else preset
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


def with_config(model: BLTModel, config: BLTConfig) -> BLTModel:
    """The same weights under a config that changes only patching fields (threshold, max length)."""
    new = BLTModel(config).to(dtype=model.dtype, device=model.device)
    new.load_state_dict(model.state_dict())
    return new.eval()


def default_model_available() -> bool:
    """Is a trained default model shipped in this installation?"""
    return is_native_checkpoint(DEFAULT_MODEL_DIR)


def load_model(spec: str | Path | BLTModel, *, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> BLTModel:
    """A model from a spec: a checkpoint directory (native, Hugging Face or original layout, see
    :mod:`blt_decode.formats`), ``"default"`` (the model shipped in the package),
    ``"random:PRESET"`` or ``"random:PRESET:SEED"`` (presets: tiny, small), or a model (returned as is,
    moved to ``dtype``/``device`` if given)."""
    if isinstance(spec, BLTModel):
        model = spec
    else:
        spec_str = str(spec)
        if spec_str.startswith("random:"):
            parts = spec_str.split(":")
            if len(parts) not in (2, 3) or parts[1] not in PRESETS or (len(parts) == 3 and not parts[2].isdigit()):
                raise UnknownModelError(
                    f"bad random model spec {spec_str!r}: use random:PRESET or random:PRESET:SEED with PRESET in {sorted(PRESETS)}"
                )
            model = random_model(parts[1], int(parts[2]) if len(parts) == 3 else 0)
        elif spec_str == "default":
            if not is_native_checkpoint(DEFAULT_MODEL_DIR):
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


# -- generation ---------------------------------------------------------------------------------------
@attrs.frozen
class Generation:
    output: bytes
    stats: DecodeStats
    prompt: bytes
    trace: Trace | None = None  #: decoding events, with generate(..., trace=True)

    @property
    def text(self) -> str:
        """The output decoded leniently for display (invalid UTF-8 becomes U+FFFD)."""
        return tokenizer.display(self.output)


class Stream:
    """Iterates over byte chunks as the strategy commits them; ``stats`` and ``output`` are set once the
    iteration ends (also when the consumer stops early)."""

    def __init__(self, model: str | Path | BLTModel, prompt: str | bytes, *, strategy: str = "autoregressive",
                 backend: str = "eager", max_new_bytes: int = DEFAULT_MAX_NEW_BYTES,
                 stop: Sequence[str | bytes] = (), seed: int | None = None, trace: bool = False, **options: Any):
        # Everything that can fail on bad input fails here, before any decoding starts.
        self.strategy = plugins.get_strategy(strategy)
        self.backend = plugins.get_backend(backend)
        self.options = plugins.make_options(self.strategy, options)
        self.model = load_model(model)
        self.prompt = tokenizer.to_bytes(prompt)
        if max_new_bytes < 0:
            raise ValueError(f"max_new_bytes must be >= 0, got {max_new_bytes}")
        self.max_new_bytes = max_new_bytes
        limit = self.model.config.max_seqlen
        if len(self.prompt) + 1 + max_new_bytes > limit:
            raise PromptTooLongError(
                f"prompt of {len(self.prompt)} bytes + BOS + max_new_bytes={max_new_bytes} exceeds the model's "
                f"limit of {limit} positions (at most {limit - 1 - max_new_bytes} prompt bytes with this max_new_bytes)"
            )
        self.stops = [tokenizer.to_bytes(s) for s in stop]
        if any(not s for s in self.stops):
            raise ValueError("stop sequences must not be empty")
        self.seed = seed if seed is not None else int(torch.seed() % 2**31)
        self.output: bytes | None = None
        self.stats: DecodeStats | None = None
        self.trace: Trace | None = Trace() if trace else None
        self._started = False

    def __iter__(self) -> Iterator[bytes]:
        if self._started:
            raise RuntimeError("a Stream can be iterated once")
        self._started = True
        prompt_ids = tuple(tokenizer.encode(self.prompt))
        capacity = len(prompt_ids) + self.max_new_bytes + self.strategy.lookahead(self.options) + 1
        session = self.backend.open_session(self.model, capacity)
        session.trace = self.trace
        context = DecodeContext(prompt_ids, self.max_new_bytes, torch.Generator().manual_seed(self.seed))
        out = bytearray()
        tokens = 0
        reason = "max_new_bytes" if self.max_new_bytes == 0 else None
        start = time.perf_counter()
        decoder = None if reason else self.strategy.decode(session, context, self.options)
        try:
            while reason is None:
                try:
                    chunk = next(decoder)
                except StopIteration:
                    reason = "exhausted"
                    break
                fresh = bytearray()
                position = len(prompt_ids) + tokens
                for token in chunk:
                    tokens += 1
                    if token == tokenizer.EOS_ID:
                        reason = "eos"
                        break
                    if not tokenizer.is_byte(token):
                        raise RuntimeError(f"strategy {self.strategy.name!r} committed the special id {token}")
                    fresh.append(token - tokenizer.OFFSET)
                    out.append(token - tokenizer.OFFSET)
                    if any(out.endswith(s) for s in self.stops):
                        reason = "stop_sequence"
                        break
                    if len(out) == self.max_new_bytes:
                        reason = "max_new_bytes"
                        break
                session.emit(Committed(position, tuple(chunk[: tokens - (position - len(prompt_ids))])))
                if fresh:
                    yield bytes(fresh)
        finally:
            if decoder is not None:
                decoder.close()
            self.output = bytes(out)
            rec = session.stats
            self.stats = DecodeStats(
                passes=rec.passes(), params=self.model.param_counts(), prompt_bytes=len(self.prompt),
                new_bytes=len(out), new_tokens=tokens, patches=session.closed_patches,
                wall_time_s=time.perf_counter() - start, stop_reason=reason or "interrupted", seed=self.seed,
                drafted_bytes=rec.drafted_bytes, accepted_bytes=rec.accepted_bytes,
                verify_passes=rec.verify_passes, blocks=rec.blocks, denoise_passes=rec.denoise_passes,
            )


def stream(model: str | Path | BLTModel, prompt: str | bytes, **kwargs: Any) -> Stream:
    """Like :func:`generate`, but returns an iterator of byte chunks as they are committed."""
    return Stream(model, prompt, **kwargs)


def generate(model: str | Path | BLTModel, prompt: str | bytes, *, strategy: str = "autoregressive",
             backend: str = "eager", max_new_bytes: int = DEFAULT_MAX_NEW_BYTES, stop: Sequence[str | bytes] = (),
             seed: int | None = None, trace: bool = False, **options: Any) -> Generation:
    """Generate up to ``max_new_bytes`` bytes after ``prompt`` with a strategy and backend chosen by name.

    Extra keyword arguments are the strategy's options (see ``blt-decode strategies``). Generation stops
    at EOS (not included), after a stop sequence (included), or at ``max_new_bytes``. With ``trace=True``
    the result carries the decoding events (:mod:`blt_decode.trace`).
    """
    s = Stream(model, prompt, strategy=strategy, backend=backend, max_new_bytes=max_new_bytes, stop=stop,
               seed=seed, trace=trace, **options)
    chunks = list(s)
    assert s.stats is not None
    return Generation(output=b"".join(chunks), stats=s.stats, prompt=s.prompt, trace=s.trace)


# -- scoring ------------------------------------------------------------------------------------------
@attrs.frozen
class Score:
    logprobs: np.ndarray  #: natural-log probability of each byte given the bytes before it
    bits_per_byte: float


@torch.no_grad()
def score(model: str | Path | BLTModel, data: str | bytes, *, chunk_bytes: int | None = None) -> Score:
    """Per-byte log-probabilities and bits-per-byte of ``data`` under the model.

    One full forward per chunk of at most ``chunk_bytes`` bytes (default: the model's max_seqlen - 1);
    each chunk starts a fresh sequence with BOS, so chunks do not see each other.
    """
    model = load_model(model)
    raw = tokenizer.to_bytes(data)
    if not raw:
        raise ValueError("score needs at least one byte")
    chunk = chunk_bytes or model.config.max_seqlen - 1
    if not 0 < chunk < model.config.max_seqlen:
        raise ValueError(f"chunk_bytes must be in 1..{model.config.max_seqlen - 1}, got {chunk}")
    parts = []
    for lo in range(0, len(raw), chunk):
        ids = torch.tensor([tokenizer.encode(raw[lo : lo + chunk])], device=model.device)
        logp = torch.log_softmax(model(ids).double(), dim=-1)[0, :-1]
        parts.append(logp.gather(-1, ids[0, 1:, None])[:, 0].cpu().numpy())
    logprobs = np.concatenate(parts)
    return Score(logprobs=logprobs, bits_per_byte=float(-logprobs.sum() / math.log(2) / len(raw)))
