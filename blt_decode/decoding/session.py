"""The decode session: one sequence's incremental BLT decoding (KV caches, rollback) in a slot of a
:class:`~blt_decode.execution.runner.DecodeState`, of its own or shared under the batched engine. Strategies touch
the model only through its primitives (prefill, append, truncate, draft, verify, denoise,
reference_logits; docs/plugins.md states each), which hand their calls to the state's runner and are the
only counters of forward passes."""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Sequence, Union

import attrs
import torch

from blt_decode.decoding.stats import StatsRecorder
from blt_decode.errors import StrategyError
from blt_decode.execution.runner import (CallResult, DecodeState, EagerRunner, Runner, StackRunners, closed_patches,
                                         non_finite)
from blt_decode.model.blt import BLTModel, ParamCounts, block_latent_index
from blt_decode.model.stacks import Stack
from blt_decode.trace import Drafted, RolledBack, Trace


# -- calls ---------------------------------------------------------------------------------------------
@attrs.frozen
class Append:
    """Commit ``ids`` after the sequence (prefill, append, verify)."""

    kind: ClassVar[str] = "append"
    ids: tuple[int, ...]


@attrs.frozen
class Draft:
    """Decoder-only logits for ``ids`` after the committed sequence and earlier drafts (stale latent)."""

    kind: ClassVar[str] = "draft"
    ids: tuple[int, ...]


@attrs.frozen
class Denoise:
    """Decoder-only logits of a masked block right after the committed sequence."""

    kind: ClassVar[str] = "denoise"
    block: tuple[int, ...]


Call = Union[Append, Draft, Denoise]
#: runs one call of a session and returns the runner's record of it (alone, or batched by the engine)
Executor = Callable[["DecodeSession", Call], CallResult]


def _run_now(session: "DecodeSession", call: Call) -> CallResult:
    return session.state.runner.run(session.state, [(session, call)])[0]


def open_session(backend: Any, model: BLTModel, capacity: int) -> "DecodeSession":
    """A session of one sequence of up to ``capacity`` positions, run by ``backend``'s runner (the one
    way the framework builds sessions)."""
    return DecodeSession(model, capacity, backend.runner(model))


class DecodeSession:
    """One sequence's decode state and the primitives strategies decode with (see the module docstring).

    ``DecodeSession(model, capacity)`` is a lone session (its own one-slot state, run by ``runner``: the
    eager reference runner unless a backend gives another; a :class:`~blt_decode.execution.runner.StackRunners`
    means the eager runner over those stacks); the engine passes ``state``, ``slot`` and an ``executor``
    that batches the primitives' calls."""

    def __init__(self, model: BLTModel, capacity: int, runner: Runner | StackRunners | None = None, *,
                 state: DecodeState | None = None, slot: int = 0, executor: Executor | None = None):
        if state is None:
            if runner is None or isinstance(runner, StackRunners):
                runner = EagerRunner(model, runner)
            state = runner.new_state(1, capacity)
        if capacity > state.capacity or not 0 <= slot < state.slots:
            raise ValueError(f"slot {slot} with capacity {capacity} does not fit a state of {state.slots} slots x {state.capacity}")
        self.model = model
        self.state, self.slot = state, slot
        self.capacity = capacity
        self.executor = executor or _run_now
        self.starts: list[int] = []
        self.length = 0
        self._draft_length = 0
        self._param_counts: ParamCounts | None = None
        self.stats = StatsRecorder()
        self.trace: Trace | None = None  # attached by generate(..., trace=True)
        #: the strategy decoding with this session (set by the framework), named in protocol errors
        self.strategy_name: str | None = None
        state.reset(slot, 0)  # the slot may hold another sequence's leftovers

    def emit(self, event: object) -> None:
        """Record a trace event (a no-op unless tracing is on)."""
        if self.trace is not None:
            self.trace.emit(event)

    # -- state ------------------------------------------------------------------------------------
    @property
    def entropies(self) -> list[float]:
        """The patcher's entropy at each committed position (read from the state: one host read)."""
        return self.state.entropy_history(self.slot, self.length)

    @property
    def draft_length(self) -> int:
        """Drafted positions after the committed ones (0 after every append, denoise and truncate)."""
        return self._draft_length

    @property
    def closed_patches(self) -> int:
        """Patches whose global latent exists (every patch but the one still open)."""
        return closed_patches(self.starts)

    @property
    def next_logits(self) -> torch.Tensor:
        """Logits for the byte after the committed sequence."""
        if self.length == 0:
            raise RuntimeError("the session is empty: prefill it first")
        return self.state.logits[self.slot, self.length - 1]

    @property
    def ids(self) -> torch.Tensor:
        """This sequence's id buffer (``capacity`` positions; committed ids, then drafts, then stale ones)."""
        return self.state.ids[self.slot]

    @property
    def param_counts(self) -> ParamCounts:
        """Parameters read per forward pass of each module (what Eq. 8 weighs passes by): lets a strategy
        plan its passes' cost without touching the model."""
        if self._param_counts is None:
            self._param_counts = self.model.param_counts()
        return self._param_counts

    def token_ids(self) -> list[int]:
        """The committed ids (BOS first) as a list."""
        return self.state.ids[self.slot, : self.length].tolist()

    def _token_ids(self, ids: Sequence[int], primitive: str) -> tuple[int, ...]:
        """``ids`` as a tuple of ints in the model's vocabulary. Checked here, before the call joins a
        batch: an out-of-range id would otherwise fail the batched pass of every request in it."""
        ids = tuple(int(i) for i in ids)
        if not ids:
            raise ValueError(f"{primitive} needs at least one id")
        vocab = self.model.config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            bad = next(i for i in ids if not 0 <= i < vocab)
            who = f"strategy {self.strategy_name!r}" if self.strategy_name else "the caller"
            raise StrategyError(f"{who} passed id {bad} to session.{primitive}; token ids are 0..{vocab - 1}")
        return ids

    def _check_room(self, end: int) -> None:
        if end > self.capacity:
            raise RuntimeError(f"decode session capacity {self.capacity} exceeded (position {end})")

    # -- primitives -------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, ids: Sequence[int]) -> torch.Tensor:
        """Start the session with ``ids`` (BOS first); returns logits [len(ids), vocab]."""
        if self.length:
            self.truncate(0)
        return self.append(ids)

    @torch.no_grad()
    def append(self, ids: Sequence[int]) -> torch.Tensor:
        """Commit ``ids`` after the current sequence; returns their next-byte logits [len(ids), vocab]."""
        ids = self._token_ids(ids, "append")
        self._check_room(self.length + len(ids))
        return self._execute(Append(ids))

    @torch.no_grad()
    def verify(self, ids: Sequence[int]) -> torch.Tensor:
        """One full pass (patcher, encoder, global, decoder) over drafted ids, committing them; the
        caller truncates back to what it accepts. Returns logits [len(ids), vocab]."""
        self.stats.add(verify_passes=1)
        return self.append(ids)

    @torch.no_grad()
    def draft(self, ids: Sequence[int]) -> torch.Tensor:
        """Decoder-only logits for ids placed after the committed sequence and earlier drafts, reading
        the last available latent (no patcher, no global model). Returns logits [len(ids), vocab]."""
        ids = self._token_ids(ids, "draft")
        if self.closed_patches == 0:
            raise RuntimeError("draft needs at least one closed patch: prefill first")
        self._check_room(self.length + self._draft_length + len(ids))
        return self._execute(Draft(ids))

    @torch.no_grad()
    def denoise(self, block_ids: Sequence[int]) -> torch.Tensor:
        """Decoder-only logits [B, vocab] for a block of ids (:data:`~blt_decode.model.tokenizer.MASK_ID` where unknown)
        at positions length..length+B-1: logits row i predicts the byte AT position length+i (masked
        diffusion).

        The block enters through the encoder's byte embedding only, attends to the committed bytes
        (sliding window) and bidirectionally to itself, and cross-attends to the latent clean position
        length-1 reads. Its keys go to scratch cache slots past the committed length, which the next
        append overwrites. Counts one decoder pass."""
        block = self._token_ids(block_ids, "denoise")
        if self.length == 0:
            raise RuntimeError("denoise needs a committed prefix: prefill first")
        self._check_room(self.length + len(block))
        if block_latent_index(self.starts, self.length) < 0:
            raise RuntimeError("denoise needs at least one closed patch: prefill first")
        return self._execute(Denoise(block))

    def _execute(self, call: Call) -> torch.Tensor:
        """Run ``call`` and apply the runner's record of it: the session alone writes its state."""
        result = self.executor(self, call)
        self.stats.count(result.passes)
        if result.starts is not None:
            self.starts = list(result.starts)
        for event in result.events:
            self.emit(event)
        if isinstance(result.output, BaseException):
            raise result.output
        if call.kind == "append":
            self.length += len(call.ids)
            self._draft_length = 0
        elif call.kind == "draft":
            self.emit(Drafted(self.length + self._draft_length, call.ids))
            self._draft_length += len(call.ids)
        else:
            self._draft_length = 0
            self.stats.add(denoise_passes=1)
        return result.output

    def move_to(self, state: DecodeState) -> None:
        """Continue in ``state`` (the engine grew its state and copied this slot's contents into it)."""
        self.state = state

    def truncate(self, length: int) -> None:
        """Roll the session back to its first ``length`` ids (drafts are discarded too)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a session of length {self.length} to {length}")
        self.length = length
        self._draft_length = 0
        self.starts = [s for s in self.starts if s <= length] if length else []
        self.state.reset(self.slot, length)
        self.emit(RolledBack(length))

    @torch.no_grad()
    def reference_logits(self, ids: Sequence[int]) -> torch.Tensor:
        """Logits [len(ids), vocab] from the full uncached forward over ``ids``; leaves the session's
        caches alone but records the patch layout so statistics stay meaningful. Runs at once, unbatched
        (it exists to compare against the public reference generator)."""
        model = self.model
        batch = torch.as_tensor([list(ids)], dtype=torch.long, device=model.device)
        layout = model.patch_layout(batch)
        if layout.entropies is not None and not torch.isfinite(layout.entropies).all():
            raise non_finite("entropy model (patcher)", 0, len(ids))
        logits = model(batch, layout)[0]
        self.stats.count(s for s in Stack if s is not Stack.PATCHER or model.patcher.uses_entropy)
        if not torch.isfinite(logits).all():
            raise non_finite("model (full forward)", 0, len(ids))
        self.starts = list(layout.starts[0])
        return logits
