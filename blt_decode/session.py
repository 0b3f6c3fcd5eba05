"""The decode session: incremental BLT decoding with KV caches and rollback, one sequence at a time or many.

A :class:`DecodeSession` is one sequence: its ids so far, their entropies and patch starts, and its slot
in a :class:`DecodeState`, which holds the tensors of one or more sequences (ids, the encoder's byte
states, the latents of closed patches, the logits at every position, and one
:class:`~blt_decode.cache.KVCache` per module: entropy model, encoder, global model, decoder). A session
made on its own gets a state of one slot; the batched :class:`~blt_decode.engine.Engine` gives many
sessions slots of one shared state.

Strategies touch the model only through the session's primitives:

- :meth:`~DecodeSession.prefill` / :meth:`~DecodeSession.append` process new ids (one forward pass per
  module over the chunk) and return their next-byte logits. The global model runs only when the chunk
  closes patches.
- :meth:`~DecodeSession.truncate` rolls everything back to a shorter length (set lengths back; nothing is
  recomputed).
- :meth:`~DecodeSession.draft` runs encoder + decoder only on ids past the committed length, reusing the
  last available latent (BLT-S drafting). Drafts are scratch: the next append or truncate discards them.
- :meth:`~DecodeSession.verify` is :meth:`~DecodeSession.append` counted as a verification pass.
- :meth:`~DecodeSession.denoise` runs the decoder only over a (partly) masked block placed right after the
  committed sequence (BLT-D): the block sees the committed bytes and itself, reads the latent of the
  patch before its start, and its logits predict the byte AT each block position. Scratch, like drafts.
- :meth:`~DecodeSession.reference_logits` runs the full uncached forward (the public reference
  generator's way).

A primitive hands its call to the session's *executor*. A lone session runs it at once
(:func:`run_calls` with one call); under the engine the call waits until every live request has its next
call ready, and :func:`run_calls` then runs them all as one forward pass per stack: ragged lengths,
per-row positions and patch boundaries, the global model only for rows whose patch closed. The logic
below is written once, for a batch; a lone session is a batch of one. Every primitive counts its forward
passes into its session's :attr:`~DecodeSession.stats`; nobody else counts.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence, Union

import attrs
import torch

from blt_decode.cache import AttentionGroup, KVCache, RowLayout
from blt_decode.errors import NonFiniteError, StrategyError
from blt_decode.model import BLTModel, ParamCounts, block_latent_index, latent_index
from blt_decode.patcher import entropy_of_logits
from blt_decode.stats import StatsRecorder
from blt_decode.trace import Drafted, GlobalPass, PatchClosed, Trace


@attrs.frozen
class StackRunners:
    """The callables a session runs the four transformer stacks with: ``entropy(ids, rows, cache)``,
    ``encoder(embeds, rows, cache)``, ``global_(patch_vectors, rows, cache)`` and
    ``decoder(byte_states, latents, rows, cache)`` (see :class:`~blt_decode.cache.RowLayout`).

    The eager backend uses the model's modules themselves; the compiled backend swaps in compiled
    versions. The session's decoding logic (what runs when) is the same for every backend."""

    entropy: Callable[..., torch.Tensor] | None
    encoder: Callable[..., torch.Tensor]
    global_: Callable[..., torch.Tensor]
    decoder: Callable[..., torch.Tensor]

    @classmethod
    def eager(cls, model: BLTModel) -> "StackRunners":
        """The model's own modules, called as they are (the eager backend)."""
        return cls(model.entropy_model, model.local_encoder, model.global_transformer, model.local_decoder)


class DecodeState:
    """The tensors of up to ``slots`` sequences of ``capacity`` positions each, and the stacks' KV caches.

    Allocated once (per lone session, or per engine) and reused: a slot is given to one sequence at a
    time; what a previous sequence left in it is overwritten as the new one grows."""

    def __init__(self, model: BLTModel, slots: int, capacity: int, runners: StackRunners | None = None):
        cfg = model.config
        self.model = model
        self.slots, self.capacity = slots, capacity
        self.runners = runners or StackRunners.eager(model)
        dtype, device = model.dtype, model.device
        self.ids = torch.zeros(slots, capacity, dtype=torch.long, device=device)
        self.byte_states = torch.zeros(slots, capacity, cfg.encoder.dim, dtype=dtype, device=device)
        self.latents = torch.zeros(slots, capacity, cfg.global_.dim, dtype=dtype, device=device)
        self.logits = torch.zeros(slots, capacity, cfg.vocab_size, dtype=dtype, device=device)

        def cache(stack) -> KVCache:
            return stack.new_cache(capacity, slots=slots, dtype=dtype, device=device)

        self.entropy_cache = cache(model.entropy_model) if model.entropy_model is not None else None
        self.encoder_cache = cache(model.local_encoder)
        self.global_cache = cache(model.global_transformer)
        self.decoder_cache = cache(model.local_decoder)


# -- calls ---------------------------------------------------------------------------------------------
@attrs.frozen
class Append:
    """Commit ``ids`` after the sequence (prefill, append, verify)."""

    ids: tuple[int, ...]


@attrs.frozen
class Draft:
    """Decoder-only logits for ``ids`` after the committed sequence and earlier drafts (stale latent)."""

    ids: tuple[int, ...]


@attrs.frozen
class Denoise:
    """Decoder-only logits of a masked block right after the committed sequence."""

    block: tuple[int, ...]


Call = Union[Append, Draft, Denoise]
Executor = Callable[["DecodeSession", Call], torch.Tensor]


def _run_now(session: "DecodeSession", call: Call) -> torch.Tensor:
    result = run_calls(session.state, [(session, call)])[0]
    if isinstance(result, BaseException):
        raise result
    return result


class DecodeSession:
    """One sequence's decode state and the primitives strategies decode with (see the module docstring).

    ``DecodeSession(model, capacity)`` is a lone session (its own one-slot :class:`DecodeState`); the
    engine passes ``state``, ``slot`` and an ``executor`` that batches the primitives' calls."""

    def __init__(self, model: BLTModel, capacity: int, runners: StackRunners | None = None, *,
                 state: DecodeState | None = None, slot: int = 0, executor: Executor | None = None):
        if state is None:
            state = DecodeState(model, 1, capacity, runners)
        if capacity > state.capacity or not 0 <= slot < state.slots:
            raise ValueError(f"slot {slot} with capacity {capacity} does not fit a state of {state.slots} slots x {state.capacity}")
        self.model = model
        self.state, self.slot = state, slot
        self.capacity = capacity
        self.executor = executor or _run_now
        self.entropies: list[float] = []
        self.starts: list[int] = []
        self.length = 0
        self._draft_length = 0
        self._param_counts: ParamCounts | None = None
        self.stats = StatsRecorder()
        self.trace: Trace | None = None  # attached by generate(..., trace=True)
        #: the strategy decoding with this session (set by the framework), named in protocol errors
        self.strategy_name: str | None = None

    def emit(self, event: object) -> None:
        """Record a trace event (a no-op unless tracing is on)."""
        if self.trace is not None:
            self.trace.emit(event)

    # -- state ------------------------------------------------------------------------------------
    @property
    def closed_patches(self) -> int:
        """Patches whose global latent exists (every patch but the one still open)."""
        return max(len(self.starts) - 1, 0)

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
        return self.executor(self, Append(ids))

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
        return self.executor(self, Draft(ids))

    @torch.no_grad()
    def denoise(self, block_ids: Sequence[int]) -> torch.Tensor:
        """Decoder-only logits [B, vocab] for a block of ids (:data:`~blt_decode.tokenizer.MASK_ID` where unknown)
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
        return self.executor(self, Denoise(block))

    def truncate(self, length: int) -> None:
        """Roll the session back to its first ``length`` ids (drafts are discarded too)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a session of length {self.length} to {length}")
        self.length = length
        self._draft_length = 0
        del self.entropies[length:]
        self.starts = [s for s in self.starts if s <= length] if length else []

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
        self.stats.add(patcher=1 if model.patcher.uses_entropy else 0, encoder=1, global_=1, decoder=1)
        if not torch.isfinite(logits).all():
            raise non_finite("model (full forward)", 0, len(ids))
        self.starts = list(layout.starts[0])
        return logits


# -- running calls -------------------------------------------------------------------------------------
def non_finite(module: str, start: int, end: int) -> NonFiniteError:
    """The error for NaN/inf produced by ``module`` at positions ``start..end-1``."""
    return NonFiniteError(
        f"the {module} produced NaN or infinite values at positions {start}..{end - 1}: the model's weights "
        "or inputs are broken (in float16 or bfloat16, activations may also overflow)"
    )


class Rows:
    """Ragged rows of one stack call: row b is ``lengths[b]`` positions of the sequence in cache slot
    ``slots[b]``, starting at ``starts[b]``; with the packed (slot, position) of every position, row by row."""

    def __init__(self, slots: Sequence[int], starts: Sequence[int], lengths: Sequence[int], device: torch.device):
        self.slots, self.starts, self.lengths = list(slots), list(starts), list(lengths)
        self.packed_slots = torch.tensor([s for s, n in zip(slots, lengths) for _ in range(n)], device=device)
        self.packed_positions = torch.tensor([p for s, n in zip(starts, lengths) for p in range(s, s + n)],
                                             device=device)

    def split(self, packed: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each row's part of packed values [N, ...]."""
        return packed.split(self.lengths)


#: attention groups by row length: rows of up to 16 positions (steps, drafts, verifications), up to 64
#: (diffusion blocks, long verifications), and longer ones (prompt prefills)
GROUP_LIMITS = (16, 64)


def row_layout(rows: Rows, window: int | None, device: torch.device, *,
               bidirectional_from: Sequence[int | None] | None = None, dtype: torch.dtype = torch.float32) -> RowLayout:
    """The :class:`RowLayout` of a stack call over ``rows``.

    Query position q of a row attends to the row's keys j with j <= q and q - j < ``window``; a row
    with ``bidirectional_from[b] = s`` also attends to every key j >= s of the chunk (a diffusion block
    sees itself both ways). Rows are grouped by length (:data:`GROUP_LIMITS`) for attention, each group
    one grid; in a grid, the cells past a row's length attend to key 0 only and are never read."""
    lengths = rows.lengths
    bidirectional = list(bidirectional_from) if bidirectional_from is not None else [None] * len(lengths)
    bucket = [sum(n > limit for limit in GROUP_LIMITS) for n in lengths]
    first = [sum(lengths[:b]) for b in range(len(lengths))]
    groups = []
    for kind in sorted(set(bucket)):
        members = [b for b in range(len(lengths)) if bucket[b] == kind]
        group = _attention_group([rows.slots[b] for b in members], [rows.starts[b] for b in members],
                                 [lengths[b] for b in members], window, [bidirectional[b] for b in members],
                                 device, dtype)
        if len(set(bucket)) > 1:
            packed = torch.tensor([first[b] + j for b in members for j in range(lengths[b])], device=device)
            group = group._replace(members=packed)
        groups.append(group)
    return RowLayout(rows.packed_slots, rows.packed_positions, tuple(groups))


def _attention_group(slots: list[int], starts: list[int], lengths: list[int], window: int | None,
                     bidirectional_from: list[int | None], device: torch.device, dtype: torch.dtype) -> AttentionGroup:
    b, t = len(slots), max(lengths)
    start_t = torch.tensor(starts, device=device)
    length_t = torch.tensor(lengths, device=device)
    offsets = torch.arange(t, device=device)
    q = (start_t[:, None] + offsets[None, :])[:, :, None]
    kv_len = max(s + n for s, n in zip(starts, lengths))
    keys = torch.arange(kv_len, device=device)[None, None, :]
    mask = keys <= q
    if window is not None:
        mask &= (q - keys) < window
    if any(s is not None for s in bidirectional_from):
        frm = torch.tensor([kv_len if s is None else s for s in bidirectional_from], device=device)
        mask |= keys >= frm[:, None, None]
    mask &= keys < (start_t + length_t)[:, None, None]
    grid = None
    if any(n != t for n in lengths):
        mask |= (offsets[None, :] >= length_t[:, None])[:, :, None] & (keys == 0)
        grid = torch.tensor([row * t + j for row, n in enumerate(lengths) for j in range(n)], device=device)
    read_slots = None if slots == list(range(b)) else torch.tensor(slots, device=device)
    # additive, in the model's dtype: attention would otherwise convert a boolean mask in every layer
    additive = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, float("-inf"))
    return AttentionGroup(None, additive[:, None], grid, read_slots)


def run_calls(state: DecodeState, items: Sequence[tuple[DecodeSession, Call]]) -> list[torch.Tensor | BaseException]:
    """Run the calls of several sessions of ``state`` (at most one call per session) as one forward pass
    per stack over their packed positions. Returns, per call, its logits or the exception that failed it
    (a failure of one row, such as non-finite values, fails only that row)."""
    model, runners, device = state.model, state.runners, state.model.device
    out: list[torch.Tensor | BaseException | None] = [None] * len(items)
    appends = [i for i, (_, c) in enumerate(items) if isinstance(c, Append)]
    drafts = [i for i, (_, c) in enumerate(items) if isinstance(c, Draft)]
    denoises = [i for i, (_, c) in enumerate(items) if isinstance(c, Denoise)]
    # where each call writes: appends at the committed length, drafts after earlier drafts
    where = {i: items[i][0].length for i in appends}
    where.update({i: items[i][0].length + items[i][0]._draft_length for i in drafts})
    if appends or drafts:  # every row's new ids in one write
        written = _rows(items, appends + drafts, where, device)
        state.ids[written.packed_slots, written.packed_positions] = torch.tensor(
            [i for r in appends + drafts for i in items[r][1].ids], device=device)

    # 1. patcher: entropies of the new positions decide which patches close
    closed_before = {i: items[i][0].closed_patches for i in appends}
    new_entropies: dict[int, list[float]] = {}
    if appends and model.patcher.uses_entropy:
        rows = _rows(items, appends, where, device)
        layout = row_layout(rows, model.config.entropy_model.sliding_window, device, dtype=model.dtype)
        logits = runners.entropy(state.ids[rows.packed_slots, rows.packed_positions], layout, state.entropy_cache)
        flat = entropy_of_logits(logits).tolist()  # the one host sync of the patcher, for every row at once
        offset = 0
        for i, n in zip(appends, rows.lengths):
            new_entropies[i] = flat[offset : offset + n]
            offset += n
            items[i][0].stats.add(patcher=1)
            if not all(map(math.isfinite, new_entropies[i])):
                out[i] = non_finite("entropy model (patcher)", where[i], where[i] + n)
    for i in appends:
        s, c = items[i]
        n, t = s.length, len(c.ids)
        del s.entropies[n:]
        s.entropies.extend(new_entropies.get(i, ()))
        if n == 0:
            s.starts = [0]
        model.patcher.extend_starts(s.starts, n, new_entropies.get(i), n + t)

    # 2. encoder over committed and drafted bytes (committed rows first: their states are a prefix)
    encoded = [i for i in appends + drafts if out[i] is None]
    states = None
    if encoded:
        rows = _rows(items, encoded, where, device)
        embeds = model.embed_at(state.ids, rows.packed_slots, rows.packed_positions)
        layout = row_layout(rows, model.config.encoder.sliding_window, device, dtype=model.dtype)
        states = runners.encoder(embeds, layout, state.encoder_cache)
        for i in encoded:
            items[i][0].stats.add(encoder=1)
        kept = sum(n for i, n in zip(encoded, rows.lengths) if i in closed_before)  # drafts' states are scratch
        if kept:
            state.byte_states[rows.packed_slots[:kept], rows.packed_positions[:kept]] = states[:kept]

    # 3. global model for the rows whose chunk closed patches
    closing = [i for i in appends if out[i] is None and items[i][0].closed_patches > closed_before[i]]
    if closing:
        _global_pass(state, items, closing, closed_before, new_entropies)

    # 4. decoder over every live row: appends and drafts (from the encoder's states), denoised blocks
    if encoded or denoises:
        _decoder_pass(state, items, encoded, denoises, states, where, out)
    return out  # type: ignore[return-value]


def _rows(items, indices: Sequence[int], where: dict[int, int], device: torch.device) -> Rows:
    return Rows([items[i][0].slot for i in indices], [where[i] for i in indices],
                [len(items[i][1].ids) for i in indices], device)


def _global_pass(state: DecodeState, items, closing: list[int], closed_before: dict[int, int],
                 new_entropies: dict[int, list[float]]) -> None:
    model, device = state.model, state.model.device
    spans = [(items[i][0].slot, s, e) for i in closing
             for s, e in zip(items[i][0].starts[closed_before[i]:], items[i][0].starts[closed_before[i] + 1:])]
    longest = max(e - s for _, s, e in spans)
    offsets = torch.arange(longest, device=device)
    span_start = torch.tensor([s for _, s, _ in spans], device=device)
    span_len = torch.tensor([e - s for _, s, e in spans], device=device)
    mask = offsets[None, :] < span_len[:, None]
    slot_index = torch.tensor([slot for slot, _, _ in spans], device=device)[:, None].expand(-1, longest)
    position_index = torch.where(mask, span_start[:, None] + offsets[None, :], 0)
    # patch vectors of every closing row, packed row by row (a row's new patches are consecutive spans)
    vectors = model.local_encoder.summarize(state.byte_states[slot_index, position_index], mask)
    counts = [items[i][0].closed_patches - closed_before[i] for i in closing]
    rows = Rows([items[i][0].slot for i in closing], [closed_before[i] for i in closing], counts, device)
    layout = row_layout(rows, model.config.global_.sliding_window, device, dtype=model.dtype)
    latents = state.runners.global_(vectors, layout, state.global_cache)
    state.latents[rows.packed_slots, rows.packed_positions] = latents
    for i, count in zip(closing, counts):
        s = items[i][0]
        first = closed_before[i]
        s.stats.add(global_=1)
        if s.trace is not None:
            entropies = s.entropies
            for start, end in zip(s.starts[first:], s.starts[first + 1 : first + count + 1]):
                by_entropy = new_entropies.get(i) is not None and end >= 2 and entropies[end - 1] > model.patcher.threshold
                s.emit(PatchClosed(start, end, entropies[end - 1] if by_entropy else None))
            s.emit(GlobalPass(first, count))


def _decoder_pass(state: DecodeState, items, encoded: list[int], denoises: list[int], states: torch.Tensor | None,
                  where: dict[int, int], out: list) -> None:
    model, device = state.model, state.model.device
    order = encoded + denoises
    starts, lengths, latent_index_flat, bidirectional = [], [], [], []
    for i in encoded:
        s, c = items[i]
        starts.append(where[i])
        lengths.append(len(c.ids))
        if isinstance(c, Append):  # each position reads the latent of the patch before its next byte's patch
            latent_index_flat += [latent_index(s.starts, p) for p in range(where[i], where[i] + len(c.ids))]
        else:  # drafts read the last available latent, wherever a patch would close
            latent_index_flat += [s.closed_patches - 1] * len(c.ids)
        bidirectional.append(None)
    for i in denoises:
        s, c = items[i]
        starts.append(s.length)
        lengths.append(len(c.block))
        latent_index_flat += [block_latent_index(s.starts, s.length)] * len(c.block)
        bidirectional.append(s.length)
    rows = Rows([items[i][0].slot for i in order], starts, lengths, device)
    inputs = [states] if encoded else []
    if denoises:  # a block enters through the byte embedding only
        blocks = torch.tensor([x for i in denoises for x in items[i][1].block], device=device)
        inputs.append(model.local_encoder.tok_embeddings(blocks))
    x = inputs[0] if len(inputs) == 1 else torch.cat(inputs)
    latents = state.latents[rows.packed_slots, torch.tensor(latent_index_flat, device=device)]
    layout = row_layout(rows, model.config.decoder.sliding_window, device,
                        bidirectional_from=bidirectional if denoises else None, dtype=model.dtype)
    logits = state.runners.decoder(x, latents, layout, state.decoder_cache)
    finite = torch.isfinite(logits).all(-1).tolist()  # one host sync for every row
    committed = sum(n for i, n in zip(order, lengths) if isinstance(items[i][1], Append))
    if committed:  # appends come first: their logits are a prefix
        state.logits[rows.packed_slots[:committed], rows.packed_positions[:committed]] = logits[:committed]
    offset = 0
    for i, n, row, x_row, latent_row in zip(order, lengths, rows.split(logits), rows.split(x), rows.split(latents)):
        s, c = items[i]
        ok = all(finite[offset : offset + n])
        offset += n
        s.stats.add(decoder=1)
        if not ok:
            out[i] = _diagnose(s, x_row, latent_row, where.get(i, s.length), n)
            continue
        if isinstance(c, Append):
            s.length = where[i] + n
            s._draft_length = 0
        elif isinstance(c, Draft):
            s._draft_length += n
            s.emit(Drafted(where[i], c.ids))
        else:
            s._draft_length = 0
            s.stats.add(denoise_passes=1)
        out[i] = row


def _diagnose(session: DecodeSession, inputs: torch.Tensor, latents: torch.Tensor, start: int, n: int) -> NonFiniteError:
    """Name the first module that went non-finite when a row's decoder logits are NaN/inf."""
    if not bool(torch.isfinite(inputs).all()):
        return non_finite("local encoder", start, start + n)
    if not bool(torch.isfinite(latents).all()):
        return non_finite("global transformer", start, start + n)
    return non_finite("local decoder", start, start + n)
