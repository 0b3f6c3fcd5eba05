"""Runners: the batched execution of the sessions' primitive calls, and the per-slot state they run on.

A :class:`DecodeState` holds the tensors of up to ``slots`` sequences (ids, entropies, byte states,
latents of closed patches, logits, one :class:`~blt_decode.model.cache.KVCache` per stack). A *runner* executes
a batch of primitive calls (:mod:`blt_decode.decoding.session`'s ``Append``/``Draft``/``Denoise``, told apart by
their ``kind``, so that this layer never imports the session's) of sessions
holding slots of one state and returns each call's logits (or the error that failed that call only).
Backends choose the runner; strategies and the engine's scheduling never see it.

:class:`EagerRunner` is the reference: ragged rows packed one after another, one forward pass per stack
(``StackRunners``: the model's modules, or compiled versions of them), the patch logic in Python. The
static runner (:mod:`blt_decode.execution.static_runner`) runs the same calls as fixed-shape compiled graphs over
device-resident bookkeeping. Both keep a session's host fields (length, drafts, patch starts) exactly as
the strategies read them.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

import attrs
import torch

from blt_decode.errors import NonFiniteError
from blt_decode.model.blt import BLTModel, block_latent_index, latent_index
from blt_decode.model.cache import AttentionGroup, KVCache, RowLayout
from blt_decode.model.patching import entropy_of_logits
from blt_decode.trace import Drafted, GlobalPass, PatchClosed

if TYPE_CHECKING:
    from blt_decode.decoding.session import Call, DecodeSession

#: ``tally(stack, rows)``: told of every batched stack call (the engine's statistics)
Tally = Callable[[str, int], None]
#: a batch of calls: (session, call), at most one call per session, all sessions of one state
Items = Sequence[tuple["DecodeSession", "Call"]]


class Runner(Protocol):
    """What executes primitive calls: makes states, and runs a batch of calls over one of them."""

    model: BLTModel

    def new_state(self, slots: int, capacity: int) -> "DecodeState": ...

    def run(self, state: "DecodeState", items: Items, tally: Tally | None = None) -> list[torch.Tensor | BaseException]:
        """Per call, its logits [len(ids), vocab] or the exception that failed it."""
        ...


@attrs.frozen
class StackRunners:
    """The callables the eager runner runs the four transformer stacks with: ``entropy(ids, rows, cache)``,
    ``encoder(embeds, rows, cache)``, ``global_(patch_vectors, rows, cache)`` and
    ``decoder(byte_states, latents, rows, cache)`` (see :class:`~blt_decode.model.cache.RowLayout`).

    The eager backend uses the model's modules themselves; the compiled backend swaps in compiled
    versions. The decoding logic (what runs when) is the same for both."""

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

        def cache(stack) -> KVCache:
            return stack.new_cache(room, slots=rows, dtype=dtype, device=device)

        self.entropy_cache = cache(model.entropy_model) if model.entropy_model is not None else None
        self.encoder_cache = cache(model.local_encoder)
        self.global_cache = cache(model.global_transformer)
        self.decoder_cache = cache(model.local_decoder)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the state by name (caches as ``<stack>_cache.keys`` / ``.values``)."""
        out = {name: value for name, value in vars(self).items() if isinstance(value, torch.Tensor)}
        for name in ("entropy_cache", "encoder_cache", "global_cache", "decoder_cache"):
            cache = getattr(self, name)
            if cache is not None:
                out[f"{name}.keys"], out[f"{name}.values"] = cache.keys, cache.values
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

    def run(self, state: DecodeState, items: Items, tally: Tally | None = None) -> list[torch.Tensor | BaseException]:
        return run_calls(state, items, self.stacks, tally)


def run_calls(state: DecodeState, items: Items, stacks: StackRunners, tally: Tally | None = None
              ) -> list[torch.Tensor | BaseException]:
    """Run the calls of several sessions of ``state`` (at most one call per session) as one forward pass
    per stack over their packed positions. Returns, per call, its logits or the exception that failed it
    (a failure of one row, such as non-finite values, fails only that row)."""
    model, device = state.model, state.model.device
    count = tally or (lambda stack, rows: None)
    out: list[torch.Tensor | BaseException | None] = [None] * len(items)
    appends = [i for i, (_, c) in enumerate(items) if c.kind == "append"]
    drafts = [i for i, (_, c) in enumerate(items) if c.kind == "draft"]
    denoises = [i for i, (_, c) in enumerate(items) if c.kind == "denoise"]
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
        entropies = entropy_of_logits(stacks.entropy(state.ids[rows.packed_slots, rows.packed_positions], layout,
                                                     state.entropy_cache))
        count("entropy", len(appends))
        state.entropies[rows.packed_slots, rows.packed_positions] = entropies
        flat = entropies.tolist()  # the one host sync of the patcher, for every row at once
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
        states = stacks.encoder(embeds, layout, state.encoder_cache)
        count("encoder", len(encoded))
        for i in encoded:
            items[i][0].stats.add(encoder=1)
        kept = sum(n for i, n in zip(encoded, rows.lengths) if i in closed_before)  # drafts' states are scratch
        if kept:
            state.byte_states[rows.packed_slots[:kept], rows.packed_positions[:kept]] = states[:kept]

    # 3. global model for the rows whose chunk closed patches
    closing = [i for i in appends if out[i] is None and items[i][0].closed_patches > closed_before[i]]
    if closing:
        _global_pass(state, items, closing, closed_before, new_entropies, stacks)
        count("global", len(closing))

    # 4. decoder over every live row: appends and drafts (from the encoder's states), denoised blocks
    if encoded or denoises:
        _decoder_pass(state, items, encoded, denoises, states, where, out, stacks)
        count("decoder", len(encoded) + len(denoises))
    return out  # type: ignore[return-value]


def _rows(items: Items, indices: Sequence[int], where: dict[int, int], device: torch.device) -> Rows:
    return Rows([items[i][0].slot for i in indices], [where[i] for i in indices],
                [len(items[i][1].ids) for i in indices], device)


def emit_patches_closed(session: "DecodeSession", first: int, count: int, entropies: Sequence[float] | None,
                        threshold: float | None) -> None:
    """Trace the ``count`` patches that closed after patch ``first`` and the global pass over them.
    ``entropies`` are the session's entropies by position (None: static patching)."""
    for start, end in zip(session.starts[first:], session.starts[first + 1 : first + count + 1]):
        by_entropy = entropies is not None and end >= 2 and entropies[end - 1] > threshold
        session.emit(PatchClosed(start, end, entropies[end - 1] if by_entropy else None))
    session.emit(GlobalPass(first, count))


def _global_pass(state: DecodeState, items: Items, closing: list[int], closed_before: dict[int, int],
                 new_entropies: dict[int, list[float]], stacks: StackRunners) -> None:
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
    latents = stacks.global_(vectors, layout, state.global_cache)
    state.latents[rows.packed_slots, rows.packed_positions] = latents
    for i, count in zip(closing, counts):
        s = items[i][0]
        s.stats.add(global_=1)
        if s.trace is not None:
            entropies = None
            if i in new_entropies:  # the committed ones and this chunk's (length is not advanced yet)
                entropies = state.entropy_history(s.slot, s.length + len(new_entropies[i]))
            emit_patches_closed(s, closed_before[i], count, entropies, model.patcher.threshold)


def _decoder_pass(state: DecodeState, items: Items, encoded: list[int], denoises: list[int], states: torch.Tensor | None,
                  where: dict[int, int], out: list, stacks: StackRunners) -> None:
    model, device = state.model, state.model.device
    order = encoded + denoises
    starts, lengths, latent_index_flat, bidirectional = [], [], [], []
    for i in encoded:
        s, c = items[i]
        starts.append(where[i])
        lengths.append(len(c.ids))
        if c.kind == "append":  # each position reads the latent of the patch before its next byte's patch
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
    logits = stacks.decoder(x, latents, layout, state.decoder_cache)
    finite = torch.isfinite(logits).all(-1).tolist()  # one host sync for every row
    committed = sum(n for i, n in zip(order, lengths) if items[i][1].kind == "append")
    if committed:  # appends come first: their logits are a prefix
        state.logits[rows.packed_slots[:committed], rows.packed_positions[:committed]] = logits[:committed]
    offset = 0
    for i, n, row, x_row, latent_row in zip(order, lengths, rows.split(logits), rows.split(x), rows.split(latents)):
        s, c = items[i]
        ok = all(finite[offset : offset + n])
        offset += n
        s.stats.add(decoder=1)
        if not ok:
            out[i] = _diagnose(x_row, latent_row, where.get(i, s.length), n)
            continue
        if c.kind == "append":
            s.length = where[i] + n
            s._draft_length = 0
        elif c.kind == "draft":
            s._draft_length += n
            s.emit(Drafted(where[i], c.ids))
        else:
            s._draft_length = 0
            s.stats.add(denoise_passes=1)
        out[i] = row


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
