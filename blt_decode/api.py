"""The public API: load a model, generate, stream, score."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Iterator, Sequence

import attrs
import numpy as np
import torch
from tqdm import tqdm

from blt_decode import plugins, tokenizer
from blt_decode.checkpoint import load_native
from blt_decode.config import PRESETS, BLTConfig
from blt_decode.decoding import Committer, utf8_text
from blt_decode.errors import InvalidRequestError, UnknownModelError
from blt_decode.formats import load_checkpoint
from blt_decode.model import BLTModel, init_weights
from blt_decode.protocol import DecodeContext
from blt_decode.request import DEFAULT_MAX_NEW_BYTES, Request, prepare
from blt_decode.stats import DecodeStats
from blt_decode.trace import Trace

DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"

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
    return (DEFAULT_MODEL_DIR / "config.json").is_file()


def load_model(spec: str | Path | BLTModel, *, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> BLTModel:
    """A model from a spec: a checkpoint directory (native, Hugging Face or original layout, see
    :mod:`blt_decode.formats`), ``"default"`` (the model shipped in the package),
    ``"random:PRESET"`` or ``"random:PRESET:SEED"`` (presets: tiny, small), or a model (returned as is,
    moved to ``dtype``/``device`` if given; a model passed in is copied, never converted in place)."""
    dtype, device = _check_dtype(dtype), _check_device(device)
    if isinstance(spec, BLTModel):
        model = spec
        if (dtype is not None and dtype != model.dtype) or (device is not None and device != model.device):
            model = copy.deepcopy(model)
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


def _check_device(device: str | torch.device | None) -> torch.device | None:
    """The device, or one clear line: an unknown name, or CUDA asked for where torch has none."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidRequestError(f"device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1): {str(exc).splitlines()[0]}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidRequestError(f"device {device!r} asked for, but torch sees no CUDA GPU (torch {torch.__version__})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InvalidRequestError(f"device {device!r} does not exist: torch sees {torch.cuda.device_count()} CUDA GPU(s)")
    return dev


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
    iteration ends (also when the consumer stops early). :meth:`text` gives the same output as text
    that never splits a UTF-8 character."""

    def __init__(self, model: str | Path | BLTModel, prompt: str | bytes, *, strategy: str = "autoregressive",
                 backend: str = "eager", max_new_bytes: int = DEFAULT_MAX_NEW_BYTES,
                 stop: str | bytes | Sequence[str | bytes] = (), seed: int | None = None, trace: bool = False,
                 **options: Any):
        # Everything that can fail on bad input fails here, before any decoding starts.
        self.backend = plugins.get_backend(backend)
        request = Request(prompt, strategy=strategy, options=options, max_new_bytes=max_new_bytes, stop=stop, seed=seed)
        self.model = load_model(model)
        self.request = prepare(request, self.model.config.max_seqlen)
        self.strategy, self.options, self.prompt = self.request.strategy, self.request.options, self.request.prompt
        self.max_new_bytes, self.seed = self.request.max_new_bytes, self.request.seed
        self.output: bytes | None = None
        self.stats: DecodeStats | None = None
        self.trace: Trace | None = Trace() if trace else None
        self._started = False

    def __iter__(self) -> Iterator[bytes]:
        if self._started:
            raise RuntimeError("a Stream can be iterated once")
        self._started = True
        request = self.request
        session = self.backend.open_session(self.model, request.capacity)
        session.trace = self.trace
        context = DecodeContext(request.prompt_ids, request.max_new_bytes, torch.Generator().manual_seed(request.seed))
        committer = Committer(request)
        decoder = None if committer.done else request.strategy.decode(session, context, request.options)
        try:
            while not committer.done:
                try:
                    chunk = next(decoder)
                except StopIteration:
                    committer.exhausted()
                    break
                fresh, event = committer.commit(chunk)
                session.emit(event)
                if fresh:
                    yield fresh
        finally:
            if decoder is not None:
                decoder.close()
            self.output = bytes(committer.out)
            self.stats = committer.stats(session.stats, self.model.param_counts(), session.closed_patches)

    def text(self) -> Iterator[str]:
        """The output as text, chunk by chunk, holding back a character split across chunks until it is
        whole (invalid UTF-8 becomes U+FFFD, as in :attr:`Generation.text`)."""
        return utf8_text(iter(self))


def stream(model: str | Path | BLTModel, prompt: str | bytes, **kwargs: Any) -> Stream:
    """Like :func:`generate`, but returns an iterator of byte chunks as they are committed
    (``.text()`` for whole characters)."""
    return Stream(model, prompt, **kwargs)


def generate(model: str | Path | BLTModel, prompt: str | bytes, *, strategy: str = "autoregressive",
             backend: str = "eager", max_new_bytes: int = DEFAULT_MAX_NEW_BYTES,
             stop: str | bytes | Sequence[str | bytes] = (), seed: int | None = None, trace: bool = False,
             **options: Any) -> Generation:
    """Generate up to ``max_new_bytes`` bytes after ``prompt`` with a strategy and backend chosen by name.

    Extra keyword arguments are the strategy's options (see ``blt-decode strategies``). Generation stops
    at EOS (not included), after a stop sequence (included; a str or bytes is one stop sequence, a list
    holds several), or at ``max_new_bytes``. Without a ``seed``, sampling strategies get one drawn from
    the operating system (global random state is never touched); the seed used is in ``stats.seed``.
    With ``trace=True`` the result carries the decoding events (:mod:`blt_decode.trace`). Bad arguments
    raise a :class:`~blt_decode.errors.BLTDecodeError` naming what is wrong before any decoding.
    """
    s = Stream(model, prompt, strategy=strategy, backend=backend, max_new_bytes=max_new_bytes, stop=stop,
               seed=seed, trace=trace, **options)
    chunks = list(s)
    assert s.stats is not None
    return Generation(output=b"".join(chunks), stats=s.stats, prompt=s.prompt, trace=s.trace)


def generate_many(model: str | Path | BLTModel, prompts: Sequence[str | bytes | Request], *,
                  strategy: str = "autoregressive", backend: str = "eager", batch_size: int = 16,
                  max_new_bytes: int = DEFAULT_MAX_NEW_BYTES, stop: str | bytes | Sequence[str | bytes] = (),
                  seed: int | None = None, progress: bool = False, **options: Any) -> list[Generation]:
    """Generate for many prompts at once with the batched :class:`~blt_decode.engine.Engine`; returns one
    :class:`Generation` per prompt, in input order, each exactly what :func:`generate` gives for it alone.

    ``prompts`` holds prompts (str/bytes; the keyword arguments apply to each) or
    :class:`~blt_decode.request.Request` objects (each with its own strategy, options, seed and limits).
    Every request is validated before any decoding starts. ``batch_size`` requests decode at a time
    (continuous batching: a finished request's slot goes to the next one at once). A request that fails
    raises its error after the others have finished."""
    from blt_decode.engine import Engine

    model = load_model(model)
    requests = [p if isinstance(p, Request) else
                Request(p, strategy=strategy, options=options, max_new_bytes=max_new_bytes, stop=stop, seed=seed)
                for p in prompts]
    engine = Engine(model, backend=backend, max_batch=batch_size)
    for r in requests:  # validate every request before queueing any
        prepare(r, model.config.max_seqlen)
    streams = [engine.submit_request(r) for r in requests]
    with tqdm(total=len(streams), desc="generate", unit="req", disable=not progress) as bar:
        done = 0
        while not engine.idle:
            engine.step()
            now = sum(s.done for s in streams)
            bar.update(now - done)
            done = now
    for s in streams:
        if s.error is not None:
            raise s.error
    return [s.result() for s in streams]


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
