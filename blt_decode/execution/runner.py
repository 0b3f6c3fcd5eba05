"""The per-slot decode state, the runner contract, and the eager reference runner.

A runner executes a batch of sessions' primitive calls (told apart by ``kind``, so this layer never imports
the session) and returns one :class:`CallResult` per call, which the session applies (docs/backends.md).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Protocol, Sequence

import attrs
import torch

from blt_decode.errors import NonFiniteError
from blt_decode.model.blt import BLTModel, block_latent_index, latent_index
from blt_decode.model.cache import AttentionGroup, KVCache, RowLayout
from blt_decode.model.patching import entropy_of_logits
from blt_decode.model.stacks import Stack, per_stack
from blt_decode.trace import GlobalPass, PatchClosed

#: ``tally(stack, rows)``: told of every batched stack call (the engine's statistics)
Tally = Callable[[Stack, int], None]


def closed_patches(starts: Sequence[int]) -> int:
    """Patches whose global latent exists, given a sequence's patch starts (every patch but the open one)."""
    return max(len(starts) - 1, 0)


class SessionView(Protocol):
    """What a runner reads of a session (:class:`~blt_decode.decoding.session.DecodeSession`); it writes
    none of it: the session applies the :class:`CallResult`."""

    slot: int
    length: int
    draft_length: int
    starts: list[int]
    trace: Any


#: a batch of calls: (session, call record), at most one call per session, all sessions of one state; the
#: records are the session's Append, Draft and Denoise, told apart by ``kind``
Items = Sequence[tuple[SessionView, Any]]


@attrs.frozen
class CallResult:
    """What a runner did for one call. The session applies it (its lengths, patch starts, statistics and
    trace): a runner reads sessions and never writes one."""

    #: the call's logits [len(ids), vocab], or the exception that failed this call alone
    output: torch.Tensor | BaseException
    #: the stacks that ran a forward pass for it
    passes: tuple[Stack, ...] = ()
    #: an append's patch starts after it (None: unchanged)
    starts: tuple[int, ...] | None = None
    #: trace events of the patches it closed (only for a session that traces)
    events: tuple[Any, ...] = ()


class Runner(Protocol):
    """What executes primitive calls: makes states, and runs a batch of calls over one of them."""

    model: BLTModel

    def new_state(self, slots: int, capacity: int) -> "DecodeState": ...

    def run(self, state: "DecodeState", items: Items, tally: Tally | None = None) -> list[CallResult]:
        """One :class:`CallResult` per call, in order."""
        ...


class StackRunners(per_stack("StackRunners", "", __name__)):
    """The callables the eager runner runs each stack with, by :class:`~blt_decode.model.stacks.Stack`:
    ``patcher(ids, rows, cache)`` (None without an entropy model), ``encoder(embeds, rows, cache)``,
    ``global_(patch_vectors, rows, cache)`` and ``decoder(byte_states, latents, rows, cache)`` (see
    :class:`~blt_decode.model.cache.RowLayout`). The eager backend uses the model's modules themselves."""

    @classmethod
    def eager(cls, model: BLTModel) -> "StackRunners":
        """The model's own modules, called as they are (the eager backend)."""
        return cls(**{stack.attr: model.stack(stack) for stack in Stack})


class DecodeState:
    """The tensors of up to ``slots`` sequences of ``capacity`` positions each, and the stacks' KV caches.

    Allocated once (per lone session, or per engine) and reused: a slot is given to one sequence at a
    time; what a previous sequence left in it is overwritten as the new one grows. ``margin`` extra
    positions per slot (and ``extra_slots`` slots) are scratch room a runner may write padding into."""

    def __init__(self, model: BLTModel, slots: int, capacity: int, runner: Runner, *, margin: int = 0,
                 extra_slots: int = 0):
        cfg = model.config
        self.model, self.runner = model, runner
        self.slots, self.capacity = slots, capacity
        rows, room = slots + extra_slots, capacity + margin
        dtype, device = model.dtype, model.device
        self.ids = torch.zeros(rows, room, dtype=torch.long, device=device)
        self.entropies = torch.zeros(rows, room, dtype=dtype, device=device)
        self.byte_states = torch.zeros(rows, room, cfg.encoder.dim, dtype=dtype, device=device)
        self.latents = torch.zeros(rows, room, cfg.global_.dim, dtype=dtype, device=device)
        self.logits = torch.zeros(rows, room, cfg.vocab_size, dtype=dtype, device=device)

        def cache(module: torch.nn.Module | None) -> KVCache | None:
            return None if module is None else module.new_cache(room, slots=rows, dtype=dtype, device=device)

        #: one KV cache per stack (None: a model without an entropy model)
        self.caches: dict[Stack, KVCache | None] = {stack: cache(model.stack(stack)) for stack in Stack}

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the state by name (caches as ``<stack>_cache.keys`` / ``.values``)."""
        out = {name: value for name, value in vars(self).items() if isinstance(value, torch.Tensor)}
        for stack, cache in self.caches.items():
            if cache is not None:
                out[f"{stack}_cache.keys"], out[f"{stack}_cache.values"] = cache.keys, cache.values
        return out

    def copy_from(self, old: "DecodeState") -> None:
        """Take over what ``old`` (a smaller state of the same runner) holds, position for position."""
        mine = self.tensors()
        for name, src in old.tensors().items():
            dst = mine[name]
            common = tuple(slice(0, min(a, b)) for a, b in zip(dst.shape, src.shape))
            dst[common] = src[common]

    def reset(self, slot: int, length: int) -> None:
        """A session of ``slot`` now holds ``length`` committed ids and no drafts (it was truncated, or
        is new). The eager runner keeps this bookkeeping on the host only; a runner whose state keeps it
        on the device overrides this."""

    def entropy_history(self, slot: int, length: int) -> list[float]:
        """The patcher's entropy at each of the first ``length`` positions of ``slot`` (one host read)."""
        return self.entropies[slot, :length].tolist()


# -- the eager runner -------------------------------------------------------------------------------------
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


class EagerRunner:
    """The reference runner: the calls' positions packed row after row, one forward pass per stack
    (through ``stacks``: the model's modules unless a backend gives compiled ones), patch decisions in
    Python. Works on any device and dtype."""

    def __init__(self, model: BLTModel, stacks: StackRunners | None = None):
        self.model = model
        self.stacks = stacks or StackRunners.eager(model)

    def new_state(self, slots: int, capacity: int) -> DecodeState:
        return DecodeState(self.model, slots, capacity, self)

    def run(self, state: DecodeState, items: Items, tally: Tally | None = None) -> list[CallResult]:
        return run_calls(state, items, self.stacks, tally)


class _Work:
    """One call's record while a batch runs: where it writes, its patch starts, what it has done."""

    def __init__(self, session: SessionView, call: Any):
        self.session, self.call = session, call
        # appends write at the committed length, drafts after earlier drafts, blocks at the committed length
        self.where = session.length + (session.draft_length if call.kind == "draft" else 0)
        self.starts = list(session.starts)
        self.passes: list[Stack] = []
        self.events: list[Any] = []
        self.output: torch.Tensor | BaseException | None = None

    @property
    def closed_patches(self) -> int:
        return closed_patches(self.starts)

    def result(self) -> CallResult:
        changed = self.call.kind == "append"
        return CallResult(self.output, tuple(self.passes), tuple(self.starts) if changed else None, tuple(self.events))


def run_calls(state: DecodeState, items: Items, stacks: StackRunners, tally: Tally | None = None) -> list[CallResult]:
    """Run the calls of several sessions of ``state`` (at most one call per session) as one forward pass
    per stack over their packed positions. Returns, per call, its :class:`CallResult` (a failure of one
    row, such as non-finite values, fails only that row)."""
    model, device = state.model, state.model.device
    count = tally or (lambda stack, rows: None)
    work = [_Work(session, call) for session, call in items]
    appends = [w for w in work if w.call.kind == "append"]
    drafts = [w for w in work if w.call.kind == "draft"]
    denoises = [w for w in work if w.call.kind == "denoise"]
    if appends or drafts:  # every row's new ids in one write
        written = _rows(appends + drafts, device)
        state.ids[written.packed_slots, written.packed_positions] = torch.tensor(
            [i for w in appends + drafts for i in w.call.ids], device=device)

    # 1. patcher: entropies of the new positions decide which patches close
    closed_before = {id(w): w.closed_patches for w in appends}
    new_entropies: dict[int, list[float]] = {}
    if appends and model.patcher.uses_entropy:
        rows = _rows(appends, device)
        layout = row_layout(rows, model.config.entropy_model.sliding_window, device, dtype=model.dtype)
        entropies = entropy_of_logits(stacks.patcher(state.ids[rows.packed_slots, rows.packed_positions], layout,
                                                     state.caches[Stack.PATCHER]))
        count(Stack.PATCHER, len(appends))
        state.entropies[rows.packed_slots, rows.packed_positions] = entropies
        flat = entropies.tolist()  # the one host sync of the patcher, for every row at once
        offset = 0
        for w, n in zip(appends, rows.lengths):
            new_entropies[id(w)] = flat[offset : offset + n]
            offset += n
            w.passes.append(Stack.PATCHER)
            if not all(map(math.isfinite, new_entropies[id(w)])):
                w.output = non_finite("entropy model (patcher)", w.where, w.where + n)
    for w in appends:
        n, t = w.where, len(w.call.ids)
        if n == 0:
            w.starts = [0]
        model.patcher.extend_starts(w.starts, n, new_entropies.get(id(w)), n + t)

    # 2. encoder over committed and drafted bytes (committed rows first: their states are a prefix)
    encoded = [w for w in appends + drafts if w.output is None]
    states = None
    if encoded:
        rows = _rows(encoded, device)
        embeds = model.embed_at(state.ids, rows.packed_slots, rows.packed_positions)
        layout = row_layout(rows, model.config.encoder.sliding_window, device, dtype=model.dtype)
        states = stacks.encoder(embeds, layout, state.caches[Stack.ENCODER])
        count(Stack.ENCODER, len(encoded))
        for w in encoded:
            w.passes.append(Stack.ENCODER)
        kept = sum(n for w, n in zip(encoded, rows.lengths) if w.call.kind == "append")  # drafts' states are scratch
        if kept:
            state.byte_states[rows.packed_slots[:kept], rows.packed_positions[:kept]] = states[:kept]

    # 3. global model for the rows whose chunk closed patches
    closing = [w for w in appends if w.output is None and w.closed_patches > closed_before[id(w)]]
    if closing:
        _global_pass(state, closing, closed_before, new_entropies, stacks)
        count(Stack.GLOBAL, len(closing))

    # 4. decoder over every live row: appends and drafts (from the encoder's states), denoised blocks
    if encoded or denoises:
        _decoder_pass(state, encoded, denoises, states, stacks)
        count(Stack.DECODER, len(encoded) + len(denoises))
    return [w.result() for w in work]


def _rows(work: Sequence[_Work], device: torch.device) -> Rows:
    return Rows([w.session.slot for w in work], [w.where for w in work], [len(w.call.ids) for w in work], device)


def patches_closed(starts: Sequence[int], first: int, count: int, entropies: Sequence[float] | None,
                   threshold: float | None) -> list[Any]:
    """The trace events of the ``count`` patches that closed after patch ``first`` and of the global pass
    over them. ``entropies`` are the session's entropies by position (None: static patching)."""
    events: list[Any] = []
    for start, end in zip(starts[first:], starts[first + 1 : first + count + 1]):
        by_entropy = entropies is not None and end >= 2 and entropies[end - 1] > threshold
        events.append(PatchClosed(start, end, entropies[end - 1] if by_entropy else None))
    events.append(GlobalPass(first, count))
    return events


def _global_pass(state: DecodeState, closing: list[_Work], closed_before: dict[int, int],
                 new_entropies: dict[int, list[float]], stacks: StackRunners) -> None:
    model, device = state.model, state.model.device
    spans = [(w.session.slot, s, e) for w in closing
             for s, e in zip(w.starts[closed_before[id(w)]:], w.starts[closed_before[id(w)] + 1:])]
    longest = max(e - s for _, s, e in spans)
    offsets = torch.arange(longest, device=device)
    span_start = torch.tensor([s for _, s, _ in spans], device=device)
    span_len = torch.tensor([e - s for _, s, e in spans], device=device)
    mask = offsets[None, :] < span_len[:, None]
    slot_index = torch.tensor([slot for slot, _, _ in spans], device=device)[:, None].expand(-1, longest)
    position_index = torch.where(mask, span_start[:, None] + offsets[None, :], 0)
    # patch vectors of every closing row, packed row by row (a row's new patches are consecutive spans)
    vectors = model.local_encoder.summarize(state.byte_states[slot_index, position_index], mask)
    counts = [w.closed_patches - closed_before[id(w)] for w in closing]
    rows = Rows([w.session.slot for w in closing], [closed_before[id(w)] for w in closing], counts, device)
    layout = row_layout(rows, model.config.global_.sliding_window, device, dtype=model.dtype)
    latents = stacks.global_(vectors, layout, state.caches[Stack.GLOBAL])
    state.latents[rows.packed_slots, rows.packed_positions] = latents
    for w, count in zip(closing, counts):
        w.passes.append(Stack.GLOBAL)
        if w.session.trace is not None:
            entropies = None
            if id(w) in new_entropies:  # the committed ones and this chunk's
                entropies = state.entropy_history(w.session.slot, w.where + len(new_entropies[id(w)]))
            w.events += patches_closed(w.starts, closed_before[id(w)], count, entropies, model.patcher.threshold)


def _decoder_pass(state: DecodeState, encoded: list[_Work], denoises: list[_Work], states: torch.Tensor | None,
                  stacks: StackRunners) -> None:
    model, device = state.model, state.model.device
    order = encoded + denoises
    starts, lengths, latent_index_flat, bidirectional = [], [], [], []
    for w in encoded:
        n = len(w.call.ids)
        starts.append(w.where)
        lengths.append(n)
        if w.call.kind == "append":  # each position reads the latent of the patch before its next byte's patch
            latent_index_flat += [latent_index(w.starts, p) for p in range(w.where, w.where + n)]
        else:  # drafts read the last available latent, wherever a patch would close
            latent_index_flat += [w.closed_patches - 1] * n
        bidirectional.append(None)
    for w in denoises:
        starts.append(w.where)
        lengths.append(len(w.call.block))
        latent_index_flat += [block_latent_index(w.starts, w.where)] * len(w.call.block)
        bidirectional.append(w.where)
    rows = Rows([w.session.slot for w in order], starts, lengths, device)
    inputs = [states] if encoded else []
    if denoises:  # a block enters through the byte embedding only
        blocks = torch.tensor([x for w in denoises for x in w.call.block], device=device)
        inputs.append(model.local_encoder.tok_embeddings(blocks))
    x = inputs[0] if len(inputs) == 1 else torch.cat(inputs)
    latents = state.latents[rows.packed_slots, torch.tensor(latent_index_flat, device=device)]
    layout = row_layout(rows, model.config.decoder.sliding_window, device,
                        bidirectional_from=bidirectional if denoises else None, dtype=model.dtype)
    logits = stacks.decoder(x, latents, layout, state.caches[Stack.DECODER])
    finite = torch.isfinite(logits).all(-1).tolist()  # one host sync for every row
    committed = sum(n for w, n in zip(order, lengths) if w.call.kind == "append")
    if committed:  # appends come first: their logits are a prefix
        state.logits[rows.packed_slots[:committed], rows.packed_positions[:committed]] = logits[:committed]
    offset = 0
    for w, n, row, x_row, latent_row in zip(order, lengths, rows.split(logits), rows.split(x), rows.split(latents)):
        ok = all(finite[offset : offset + n])
        offset += n
        w.passes.append(Stack.DECODER)
        w.output = row if ok else _diagnose(x_row, latent_row, w.where, n)


def _diagnose(inputs: torch.Tensor, latents: torch.Tensor, start: int, n: int) -> NonFiniteError:
    """Name the first module that went non-finite when a row's decoder logits are NaN/inf."""
    return diagnosis(bool(torch.isfinite(inputs).all()), bool(torch.isfinite(latents).all()), start, n)


def diagnosis(inputs_finite: bool, latents_finite: bool, start: int, n: int) -> NonFiniteError:
    """The error for a row whose decoder logits are NaN/inf, naming the first module that went wrong:
    the encoder when the decoder's inputs were already broken, the global model when the latents were."""
    if not inputs_finite:
        return non_finite("local encoder", start, start + n)
    if not latents_finite:
        return non_finite("global transformer", start, start + n)
    return non_finite("local decoder", start, start + n)
