"""The compiled backend's runner: a batch of primitive calls runs as a few step graphs (front, global,
decode, front_decode) over device-resident state, with at most two host reads per batch. The graphs
compute positions, masks and patch decisions from the state and update it in place; the host sends only
which slots take part and their ids. docs/backends.md explains the design and its measurements."""

from __future__ import annotations

import sys
import time
import types
from typing import Callable, NamedTuple, Sequence

import torch

from blt_decode.execution.runner import (CallResult, DecodeState, Items, Tally, closed_patches, diagnosis,
                                         non_finite, patches_closed)
from blt_decode.model.blt import BLTModel
from blt_decode.model.cache import GridLayout
from blt_decode.model.patching import entropy_of_logits
from blt_decode.model.stacks import Stack

#: chunk lengths a graph is compiled for; a longer append or draft runs in chunks of the largest
CHUNK_BUCKETS = (1, 16, 64)
#: rows per graph on a CUDA device (a capture per shape); more rows run as several graphs of the largest.
#: On a CPU an engine batch's graphs take any number of rows (a symbolic size: one graph for all)
ROW_BUCKETS = (1, 4, 16, 64)
#: the key of an engine batch's graph, whose rows are a symbolic size
ANY_ROWS = 0
#: patches per global graph (a step closes one, a verification a few, a prompt many); more run as several
PATCH_BUCKETS = (1, 4, 16, 64)
#: bytes of a patch the summary reads: the smallest that holds the longest closing patch (then x4; a
#: symbolic size, one graph for every span)
MIN_SPAN = 16
#: a graph reads the cache entries up to the call's live length rounded up to a multiple of this (a
#: symbolic size: one graph for every length, and no 0/1 specialisation)
REACH_STEP = 16
#: the least room of a state (so that short generations share one; a graph reads only its reach of it)
MIN_CAPACITY = 256
#: states a runner keeps for reuse
KEPT_STATES = 4

#: inductor settings of the graphs. Indices are clamped into range in the graphs, so no per-element
#: bounds checks; the runner builds every input itself (fixed shapes per graph, the state's layout), so
#: no per-call size and alignment checks of the ~60 inputs either (dynamo's guards still check them)
COMPILE_OPTIONS = {"assert_indirect_indexing": False, "size_asserts": False, "alignment_asserts": False,
                   # one-row matrix products (a batch-1 step's every projection) as fused loops instead of a
                   # BLAS call each (batch-1 AR on the shipped model, an A/B in one process on a busy
                   # machine: median 187 against 64 bytes/s; docs/benchmarks.md)
                   "post_grad_fusion_options": {"decompose_mm_pass": {}}}

APPEND, DRAFT, DENOISE = 0, 1, 2
_KIND = {"append": APPEND, "draft": DRAFT, "denoise": DENOISE}
#: per row of a descriptor: slot, kind, offset of the chunk in its call, ids in the chunk, last chunk?
_SLOT, _KIND_COL, _OFFSET, _COUNT, _FINAL, _IDS = range(6)


def bucket(n: int, sizes: Sequence[int]) -> int:
    """The smallest size in ``sizes`` >= n (n itself, rounded up to a multiple of the largest, past it)."""
    for size in sizes:
        if n <= size:
            return size
    return -(-n // sizes[-1]) * sizes[-1]


def doubling(n: int, least: int, factor: int = 2) -> int:
    """``least`` multiplied by ``factor`` until it is >= n."""
    size = least
    while size < n:
        size *= factor
    return size


class Reach(NamedTuple):
    """The cache range ``[start, end)`` a graph's rows read, as the lengths of two marker tensors (one
    graph serves every range: the lengths are symbolic sizes). Both are multiples of
    :data:`REACH_STEP`; ``start`` is stored as the length ``start + REACH_STEP``, so that no length is 0
    or 1 (sizes torch.compile would specialise on)."""

    start: torch.Tensor
    end: torch.Tensor


def _bounds(reach: Reach) -> tuple[int, int]:
    return reach.start.shape[0] - REACH_STEP, reach.end.shape[0]


class KV(NamedTuple):
    """One stack's cache buffers, as a graph sees them."""

    keys: torch.Tensor
    values: torch.Tensor


class Buffers(NamedTuple):
    """The state's tensors, the inputs every graph reads and updates in place."""

    ids: torch.Tensor  #: [slots + 1, room] (the last slot is scratch room for padding rows)
    entropies: torch.Tensor
    byte_states: torch.Tensor
    latents: torch.Tensor
    logits: torch.Tensor
    lengths: torch.Tensor  #: [slots + 1] committed positions
    drafts: torch.Tensor  #: [slots + 1] drafted positions after them
    patch_id: torch.Tensor  #: [slots + 1, room + 1] the patch holding each position (decided ones)
    patch_starts: torch.Tensor  #: [slots + 1, room + 1] where each patch starts
    patcher_kv: KV | None  #: the KV caches in Stack order
    encoder_kv: KV
    global_kv: KV
    decoder_kv: KV


class StaticState(DecodeState):
    """A :class:`DecodeState` whose sequences' bookkeeping lives on the device too, with a scratch slot
    and scratch positions for padding."""

    def __init__(self, model: BLTModel, slots: int, capacity: int, runner: "StaticRunner"):
        # room for a chunk's padding past the capacity, and at least a window and a chunk, so that a
        # windowed stack always reads its window (one graph for every state: see _layout)
        margin = max(CHUNK_BUCKETS)
        cfg = model.config
        windows = [c.sliding_window for c in (cfg.encoder, cfg.decoder, cfg.global_, cfg.entropy_model)
                   if c is not None and c.sliding_window is not None]
        margin = max(margin, max(windows, default=0) + max(CHUNK_BUCKETS) - capacity)
        super().__init__(model, slots, capacity, runner, margin=margin, extra_slots=1)
        rows, room = slots + 1, capacity + margin
        device = model.device
        self.scratch = slots  # the padding rows' slot
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)
        self.drafts = torch.zeros(rows, dtype=torch.long, device=device)
        self.patch_id = torch.zeros(rows, room + 1, dtype=torch.long, device=device)
        self.patch_starts = torch.zeros(rows, room + 1, dtype=torch.long, device=device)

        def kv(cache) -> KV | None:
            return None if cache is None else KV(cache.keys, cache.values)

        self.buffers = Buffers(self.ids, self.entropies, self.byte_states, self.latents, self.logits, self.lengths,
                               self.drafts, self.patch_id, self.patch_starts, *(kv(self.caches[stack]) for stack in Stack))
        # the slot and position extents are symbolic in the compiled graphs: one graph serves every state
        for tensor in self.tensors().values():
            slot_dim, room_dim = (1, 3) if tensor.dim() == 5 else (0, 1)
            torch._dynamo.maybe_mark_dynamic(tensor, slot_dim)
            if tensor.dim() > 1:
                torch._dynamo.maybe_mark_dynamic(tensor, room_dim)

    @property
    def room(self) -> int:
        return self.ids.shape[1]

    def reset(self, slot: int, length: int) -> None:
        self.lengths[slot] = length
        self.drafts[slot] = 0

    def restore(self, slot: int, length: int, drafts: int) -> None:
        """Set a slot's device lengths back to the host's (after a row failed)."""
        self.lengths[slot] = length
        self.drafts[slot] = drafts

    def clear(self, slot: int) -> None:
        """Zero everything a slot holds. Done when a row produced non-finite values: fixed-shape graphs read
        cache entries a sequence has not written yet (with zero attention weight), and a NaN left there
        would poison the slot's next sequence through 0 * NaN."""
        for name, tensor in self.tensors().items():
            if tensor.dim() == 5:
                tensor[:, slot] = 0
            else:
                tensor[slot] = 0


# -- what the graphs compute ---------------------------------------------------------------------------------
class _Chunk(NamedTuple):
    """Positions of a descriptor's rows, computed in the graph from the device lengths."""

    slot: torch.Tensor  #: [B]
    kind: torch.Tensor  #: [B]
    count: torch.Tensor  #: [B] real positions in the row
    start: torch.Tensor  #: [B] the row's first position
    positions: torch.Tensor  #: [B, T]
    valid: torch.Tensor  #: [B, T] real (not padding)
    write_slots: torch.Tensor  #: [N] where each packed position writes: its slot, or scratch for padding
    write_positions: torch.Tensor  #: [N]


def _chunk(buf: Buffers, desc: torch.Tensor, t: int) -> _Chunk:
    slot, kind, offset, count = desc[:, _SLOT], desc[:, _KIND_COL], desc[:, _OFFSET], desc[:, _COUNT]
    start = buf.lengths[slot] + torch.where(kind == DRAFT, buf.drafts[slot], 0) + offset
    steps = torch.arange(t, device=desc.device)
    positions = start[:, None] + steps
    valid = steps[None, :] < count[:, None]
    scratch = buf.lengths.shape[0] - 1
    write_slots = torch.where(valid, slot[:, None], scratch).reshape(-1)
    write_positions = torch.where(valid, positions, steps.clamp_max(buf.ids.shape[1] - 1)[None, :]).reshape(-1)
    return _Chunk(slot, kind, count, start, positions, valid, write_slots, write_positions)


def _layout(chunk: _Chunk, window: int | None, room: int, reach: Reach, dtype: torch.dtype, lone: bool,
            bidirectional: bool = False) -> GridLayout:
    """The layout of a stack over a chunk's rows, every row reading the cache entries in ``reach``: the
    host's bounds on the positions any row of the call can see (from the earliest any row's window
    reaches to its live length, rounded out; symbolic sizes in the compiled graphs, so one graph serves
    every length). ``lone``: one sequence in slot 0, read as a view. Otherwise every row reads the range
    of its own slot, masked to what it may attend to."""
    start, end = _bounds(reach)
    read = start + torch.arange(end - start, device=chunk.start.device)[None, :]  # [1, K]
    q, j = chunk.positions[:, :, None], read[:, None, :]
    allowed = (j < room) & (j <= q)
    if window is not None:
        allowed &= (q - j) < window
    if bidirectional:  # a denoised block sees all of itself, whatever the window
        block = (j >= chunk.start[:, None, None]) & (j < (chunk.start + chunk.count)[:, None, None])
        allowed |= (chunk.kind == DENOISE)[:, None, None] & block & (j < room)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, float("-inf"))
    return GridLayout(chunk.write_slots, chunk.write_positions, None if lone else chunk.slot, start, mask[:, None])


def _close_flags(model: BLTModel, buf: Buffers, chunk: _Chunk, entropies: torch.Tensor | None) -> torch.Tensor:
    """[B, T] bool: does position t+1 start a patch (the rule of :class:`~blt_decode.model.patching.Patcher`,
    computed on the device), for the real positions of appended rows."""
    patcher = model.patcher
    flags = chunk.positions == 0
    if patcher.threshold is not None and entropies is not None:
        # compared in float64, as the eager runner compares the entropy's Python float with the threshold
        flags = flags | (entropies.to(torch.float64) > patcher.threshold)
    live = chunk.valid & (chunk.kind == APPEND)[:, None]
    if patcher.max_patch_length is None:
        return flags & live
    # a patch also closes when it holds max_patch_length bytes: sequential in the chunk, unrolled
    current = buf.patch_starts[chunk.slot, buf.patch_id[chunk.slot, chunk.start]]
    out = []
    for step in range(chunk.positions.shape[1]):
        position = chunk.positions[:, step]
        flag = flags[:, step] | (position + 1 - current >= patcher.max_patch_length)
        out.append(flag)
        current = torch.where(flag & live[:, step], position + 1, current)
    return torch.stack(out, 1) & live


def _front(model: BLTModel, buf: Buffers, desc: torch.Tensor, reach: Reach, t: int, lone: bool,
           decide: bool = True) -> torch.Tensor:
    """Appended and drafted ids: write them, embed them, run the entropy model (when ``decide``) and the
    encoder, store entropies and byte states, and decide patch closes, updating the device's patch
    bookkeeping. Returns [B, T + 1] int8: the close flags, then 1 where the row's entropies are finite."""
    chunk = _chunk(buf, desc, t)
    room = buf.ids.shape[1]
    ids = desc[:, _IDS:]
    slots, positions = chunk.write_slots, chunk.write_positions
    buf.ids[slots, positions] = ids.reshape(-1)
    cfg, dtype = model.config, model.dtype
    states = model.local_encoder(model.embed_at(buf.ids, slots, positions),
                                 _layout(chunk, cfg.encoder.sliding_window, room, reach, dtype, lone), buf.encoder_kv)
    buf.byte_states[slots, positions] = states
    if not decide:
        return torch.zeros(0, dtype=torch.int8, device=desc.device)
    entropies = None
    finite = torch.ones_like(chunk.valid)
    if model.entropy_model is not None and model.patcher.uses_entropy:
        layout = _layout(chunk, cfg.entropy_model.sliding_window, room, reach, dtype, lone)
        entropies = entropy_of_logits(model.entropy_model(ids.reshape(-1), layout, buf.patcher_kv)).view(ids.shape)
        buf.entropies[slots, positions] = entropies.reshape(-1)
        finite = torch.isfinite(entropies)
    flags = _close_flags(model, buf, chunk, entropies)
    # patch bookkeeping of the appended positions: the patch holding position t+1, and new patch starts
    live = (chunk.valid & (chunk.kind == APPEND)[:, None]).reshape(-1)
    first = buf.patch_id[chunk.slot, chunk.start]
    holding = (first[:, None] + flags.cumsum(1)).reshape(-1)
    after = torch.where(live, chunk.positions.reshape(-1) + 1, 0)
    scratch_slot = torch.full_like(slots, buf.lengths.shape[0] - 1)
    buf.patch_id[torch.where(live, slots, scratch_slot), after] = holding
    opened = flags.reshape(-1)
    buf.patch_starts[torch.where(opened, slots, scratch_slot), torch.where(opened, holding, 0)] = after
    ok = (finite | ~chunk.valid).all(1)
    return torch.cat([flags, ok[:, None]], 1).to(torch.int8)


def _decode(model: BLTModel, buf: Buffers, desc: torch.Tensor, reach: Reach, t: int,
            lone: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder over every row (appended, drafted, denoised), then the rows' lengths advanced where the
    chunk is the call's last. Returns logits [B, T, vocab] and [B, 3] bool: inputs, latents, logits finite."""
    chunk = _chunk(buf, desc, t)
    room = buf.ids.shape[1]
    slots, positions = chunk.write_slots, chunk.write_positions
    denoised = (chunk.kind == DENOISE)[:, None].expand(-1, t).reshape(-1)
    # a block enters through the byte embedding only; appended and drafted ids through the encoder
    embedded = model.local_encoder.tok_embeddings(desc[:, _IDS:].reshape(-1))
    x = torch.where(denoised[:, None], embedded, buf.byte_states[slots, positions])
    # appended position p reads the latent of the patch before p+1's; drafts and blocks the last closed one
    length = buf.lengths[chunk.slot]
    last_closed = buf.patch_id[chunk.slot, length] - 1
    aligned = buf.patch_id[chunk.slot[:, None], (chunk.positions + 1).clamp_max(room)] - 1
    latent_index = torch.where((chunk.kind == APPEND)[:, None], aligned, last_closed[:, None]).clamp_min(0)
    latents = buf.latents[chunk.slot[:, None].expand(-1, t).reshape(-1), latent_index.reshape(-1)]
    layout = _layout(chunk, model.config.decoder.sliding_window, room, reach, model.dtype, lone, bidirectional=True)
    logits = model.local_decoder(x, latents, layout, buf.decoder_kv)
    buf.logits[slots, positions] = logits
    # lengths: an append commits its chunk, a draft adds to the drafts; appends and blocks drop drafts
    final = desc[:, _FINAL] == 1
    end = chunk.start + chunk.count
    buf.lengths[chunk.slot] = torch.where(final & (chunk.kind == APPEND), end, length)
    buf.drafts[chunk.slot] = torch.where(final, torch.where(chunk.kind == DRAFT, end - length, 0), buf.drafts[chunk.slot])
    real = chunk.valid.reshape(-1)

    def finite(values: torch.Tensor) -> torch.Tensor:
        return (torch.isfinite(values).all(-1) | ~real).view(-1, t).all(1)

    return logits.view(-1, t, logits.shape[-1]), torch.stack([finite(x), finite(latents), finite(logits)], 1)


def _front_decode(model: BLTModel, buf: Buffers, desc: torch.Tensor, reach: Reach, t: int,
                  lone: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch without appends: drafts' encoder pass and every row's decoder pass in one graph."""
    _front(model, buf, desc, reach, t, lone, decide=False)
    return _decode(model, buf, desc, reach, t, lone)


def _global(model: BLTModel, buf: Buffers, desc: torch.Tensor, reach: Reach, patches: int, span: torch.Tensor,
            lone: bool) -> None:
    """Patch summaries and the global model for closed patches; the latents go to the state.

    ``lone``: ``desc`` is [1, 3] (slot, first patch, count): one row of ``patches`` queries, the patch
    indices from the first, so that the slot's global cache is read once. Otherwise [patches, 2] (slot,
    patch index): a row per patch, each reading its own slot. A patch's summary reads the last
    ``len(span)`` byte states up to its end (a marker tensor: its length is a symbolic size)."""
    span = span.shape[0]
    room = buf.ids.shape[1]
    if lone:
        slot, first, count = desc[:, 0], desc[:, 1], desc[:, 2]
        steps = torch.arange(patches, device=desc.device)
        index = (first[:, None] + steps).clamp_max(room - 1)  # [1, P]
        valid = steps[None, :] < count[:, None]
        scratch = buf.lengths.shape[0] - 1
        chunk = _Chunk(slot, torch.zeros_like(slot), count, first, index, valid,
                       torch.where(valid, slot[:, None], scratch).reshape(-1), torch.where(valid, index, steps[None, :]).reshape(-1))
        slots, index = slot[:, None].expand(-1, patches).reshape(-1), index.reshape(-1)
    else:
        slots, index = desc[:, 0], desc[:, 1]
        chunk = _Chunk(slots, torch.zeros_like(slots), torch.ones_like(slots), index, index[:, None],
                       torch.ones_like(index[:, None], dtype=torch.bool), slots, index)
    start, end = buf.patch_starts[slots, index], buf.patch_starts[slots, (index + 1).clamp_max(room)]
    where = end[:, None] - span + torch.arange(span, device=desc.device)
    inside = (where >= start[:, None]) & (where >= 0)
    vectors = model.local_encoder.summarize(buf.byte_states[slots[:, None], where.clamp(0, room - 1)], inside)
    layout = _layout(chunk, model.config.global_.sliding_window, room, reach, model.dtype, lone)
    buf.latents[chunk.write_slots, chunk.write_positions] = model.global_transformer(vectors, layout, buf.global_kv)


# -- running calls -------------------------------------------------------------------------------------------
class _Row(NamedTuple):
    index: int  #: the call's index in the batch
    kind: int
    ids: tuple[int, ...]
    start: int  #: the host's view of where the call writes (committed length, plus drafts for drafts)


class _Piece(NamedTuple):
    row: _Row
    offset: int  #: of the chunk in its call
    count: int

    @property
    def final(self) -> bool:
        return self.offset + self.count == len(self.row.ids)


class StaticRunner:
    """Runs batches of primitive calls as fixed-shape graphs (see the module docstring).

    ``compile=False`` runs the graphs' code eagerly (for exactness tests; same results as compiled up to
    rounding). ``progress`` is told of every graph compiled, with its seconds. ``syncs`` counts the
    runner's host reads (every read the runner makes goes through :meth:`_read`)."""

    def __init__(self, model: BLTModel, *, compile: bool = True, progress: Callable[[str], None] | None = None):
        if model.training:
            raise ValueError("the static runner needs a model in eval mode")
        self.model = model
        self.compile = compile
        self.progress = progress
        self.syncs = 0
        self._graphs: dict[tuple, Callable] = {}
        #: the model's dtype and device when the runner was made (its graphs are for those)
        self.made_for = (model.dtype, model.device)
        self.compile_seconds: dict[tuple, float] = {}
        #: on a CUDA device: step graphs captured as CUDA graphs, and replays of them
        self.cuda_graph_stats = {"captures": 0, "replays": 0}
        self._cuda_pool = torch.cuda.graph_pool_handle() if model.device.type == "cuda" else None
        self._reach_buffers = (torch.empty(0, dtype=torch.int8, device=model.device),) * 2
        self._span_buffer = torch.empty(0, dtype=torch.int8, device=model.device)
        #: a call reads back this far before its earliest row: the longest local window (None: no limit)
        windows = [c.sliding_window for c in (model.config.encoder, model.config.decoder, model.config.entropy_model)
                   if c is not None]
        self._lookback = None if None in windows else max(windows) - 1
        #: the states this runner made, least recently used first (see new_state)
        self._states: list[StaticState] = []

    def new_state(self, slots: int, capacity: int) -> StaticState:
        """A state of ``slots`` slots and at least ``capacity`` positions: one this runner made before and
        nobody holds any more, if one fits, else a new one. Reusing states keeps their addresses (what a
        captured CUDA graph replays) and saves allocating them per generation; a reused slot's leftovers
        are never read (:meth:`DecodeSession.__init__` resets its lengths)."""
        for state in self._states:
            # held by nobody but this list (the loop variable and getrefcount's argument are the others)
            if state.slots == slots and capacity <= state.capacity and sys.getrefcount(state) <= 3:
                self._states.remove(state)
                self._states.append(state)  # most recently used last
                return state
        state = StaticState(self.model, slots, max(capacity, MIN_CAPACITY), self)
        self._states.append(state)
        if len(self._states) > KEPT_STATES:  # forget the least recently used one (its holder keeps it alive)
            self._states.pop(0)
        return state

    @torch.no_grad()
    def warmup(self, *, max_batch: int = 1, lone: bool = True, chunks: Sequence[int] = CHUNK_BUCKETS,
               patches: Sequence[int] = PATCH_BUCKETS,
               progress: Callable[[int, int, str], None] | None = None) -> list[tuple]:
        """Compile now (with ``lone``) every graph a lone session uses (the lone graphs: also an engine of
        one slot's) and, with ``max_batch`` > 1, every graph of engine batches (of any size on a CPU, up to
        ``max_batch`` requests in each row bucket on a CUDA device): the front, decoder and fused graphs
        for ``chunks``, the global graph (for ``patches`` in a lone session; spans are symbolic). They run
        on padding rows of scratch states. ``progress(done, total, name)`` is told before each. Returns the
        keys compiled; later calls inside these buckets compile nothing."""
        modes = [(True, [1], patches)] if lone else []
        if max_batch > 1:
            if self._bucketed_rows:  # a global graph's rows are patches, up to the largest bucket whatever the batch
                modes.append((False, sorted({bucket(n, ROW_BUCKETS) for n in range(1, max_batch + 1)}), patches))
            else:
                modes.append((False, [ANY_ROWS], [ANY_ROWS]))
        keys = []
        for lone, rows, patch_rows in modes:
            keys += [(kind, b, t, lone) for b in rows for t in chunks for kind in ("front", "decode", "front_decode")]
            keys += [("global", p, lone) for p in patch_rows]
        keys = [k for k in keys if not getattr(self._graphs.get(k), "done", False)]
        # the states the sessions and an engine of max_batch slots will take next (new_state reuses them):
        # on a CUDA device the warm-up's captures are theirs
        states = {True: self.new_state(1, 1), False: self.new_state(max(2, max_batch), 1)}
        for done, key in enumerate(keys):
            if progress is not None:
                progress(done, len(keys), " ".join(map(str, key)))
            kind, size, *_, lone = key
            state = states[lone]
            scratch = 0 if lone else state.scratch  # a lone graph's row is slot 0's: it must be the real slot
            reach = self._reach(state, 0, 2 * REACH_STEP)  # any reach: the graphs' reach is symbolic
            count = self._padded_rows(max(size, 1), lone)
            if kind == "global":
                rows = [[scratch, 0, 0]] if lone else [[state.scratch, 0]] * count
                self.graph(*key)(self.model, state.buffers, self._rows_tensor(rows, lone), reach, size,
                                 self._span(MIN_SPAN), lone)
                continue
            length = key[2]
            desc = self._rows_tensor([[scratch, APPEND, 0, 0, 0, *[0] * length]] * count, lone)
            self.graph(*key)(self.model, state.buffers, desc, reach, length, lone)
        if progress is not None:
            progress(len(keys), len(keys), "done")
        return keys

    @property
    def _bucketed_rows(self) -> bool:
        """Rows in buckets (each its own graph) on a CUDA device, where each shape is its own capture;
        elsewhere an engine batch's rows are one symbolic size."""
        return self.model.device.type == "cuda"

    def _rows_key(self, n: int, lone: bool) -> int:
        """The rows entry of the key of a graph over ``n`` rows."""
        return bucket(n, ROW_BUCKETS) if lone or self._bucketed_rows else ANY_ROWS

    def _padded_rows(self, n: int, lone: bool) -> int:
        """Rows a graph over ``n`` rows runs (padding included): its bucket, or, for a symbolic size, at
        least 2 (torch.compile specialises sizes 0 and 1)."""
        return bucket(n, ROW_BUCKETS) if lone or self._bucketed_rows else max(n, 2)

    def _rows_tensor(self, rows: list[list[int]], lone: bool) -> torch.Tensor:
        """A descriptor of ``rows`` on the device; an engine batch's first size marked symbolic."""
        desc = torch.tensor(rows, device=self.model.device)
        if not lone and not self._bucketed_rows:
            torch._dynamo.maybe_mark_dynamic(desc, 0)
        return desc

    def _span(self, span: int) -> torch.Tensor:
        """The ``span`` argument of a global graph: a marker of that length, marked dynamic."""
        if self._span_buffer.shape[0] < span:
            self._span_buffer = torch.empty(span, dtype=torch.int8, device=self.model.device)
        view = self._span_buffer[:span]
        torch._dynamo.maybe_mark_dynamic(view, 0)
        return view

    # -- graphs ---------------------------------------------------------------------------------------
    def graph(self, kind: str, *sizes: int) -> Callable:
        """The step function of ``kind`` ("front", "decode", "front_decode", "global") for the static
        ``sizes`` (rows, chunk length and lone; patches and lone for "global"; rows and patches
        :data:`ANY_ROWS` for a symbolic size), compiled on first use."""
        key = (kind, *sizes)
        fn = self._graphs.get(key)
        if fn is None:
            base = {"front": _front, "decode": _decode, "front_decode": _front_decode, "global": _global}[kind]
            if self.compile:
                name = "_".join([kind, *(str(s) for s in sizes)])
                compiled = torch.compile(_renamed(base, name), fullgraph=True, dynamic=False, options=COMPILE_OPTIONS)
                fn = _Compiled(compiled, key, self)
                if self.model.device.type == "cuda":
                    fn = _CudaGraphed(fn, self)
            else:
                fn = base
            self._graphs[key] = fn
        return fn

    def _reach(self, state: StaticState, start: int, end: int) -> Reach:
        """The ``reach`` argument of a graph whose rows see positions in ``[start, end)``: views of two
        marker buffers, ``start`` rounded down and ``end`` up to :data:`REACH_STEP` (at most the
        state's room), marked dynamic."""
        end = min(state.room, -(-max(end, 1) // REACH_STEP) * REACH_STEP)
        start = min(max(start, 0) // REACH_STEP * REACH_STEP, end - REACH_STEP)
        if self._reach_buffers[0].shape[0] < state.room + REACH_STEP:
            self._reach_buffers = tuple(torch.empty(state.room + REACH_STEP, dtype=torch.int8, device=self.model.device)
                                        for _ in range(2))
        views = Reach(self._reach_buffers[0][: start + REACH_STEP], self._reach_buffers[1][:end])
        for view in views:
            torch._dynamo.maybe_mark_dynamic(view, 0)
        return views

    def _read(self, tensor: torch.Tensor) -> list:
        """The runner's every host read goes through here (counted in :attr:`syncs`)."""
        self.syncs += 1
        return tensor.tolist()

    # -- a batch --------------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, state: StaticState, items: Items, tally: Tally | None = None) -> list[CallResult]:
        model = self.model
        count = tally or (lambda stack, n: None)
        rows = []
        for i, (s, c) in enumerate(items):
            kind = _KIND[c.kind]
            rows.append(_Row(i, kind, tuple(c.block if kind == DENOISE else c.ids),
                             s.length + (s.draft_length if kind == DRAFT else 0)))
        # a call longer than the largest chunk runs in rounds (a block in one: it sees itself both ways)
        largest = max(CHUNK_BUCKETS)
        rounds: list[list[_Piece]] = []
        for r in rows:
            step = len(r.ids) if r.kind == DENOISE else largest
            for k, offset in enumerate(range(0, len(r.ids), step)):
                if k == len(rounds):
                    rounds.append([])
                rounds[k].append(_Piece(r, offset, min(step, len(r.ids) - offset)))
        appends = [r for r in rows if r.kind == APPEND]
        # a state of one slot: its sequence reads its caches as views, nothing is gathered
        lone = state.slots == 1
        results = _Results(rows)
        # the appends' patch starts as this batch decides them (the sessions apply them from the results)
        starts = {r.index: list(items[r.index][0].starts) for r in appends}
        closed_before = {r.index: closed_patches(starts[r.index]) for r in appends}
        failed_entropy: set[int] = set()
        if not appends:  # drafts and blocks: encoder and decoder in one graph per group
            for pieces in rounds:
                for t, group in _groups(pieces):
                    results.add(group, *self.graph("front_decode", self._rows_key(len(group), lone), t, lone)(
                        model, state.buffers, self._descriptor(state, items, group, t), self._reach_of(state, group, t), t, lone))
        else:
            decides = model.entropy_model is not None and model.patcher.uses_entropy
            flags = []
            for pieces in rounds:  # every round's front first: none of it depends on patch decisions
                for t, group in _groups([p for p in pieces if p.row.kind != DENOISE]):
                    flags.append((group, self.graph("front", self._rows_key(len(group), lone), t, lone)(
                        model, state.buffers, self._descriptor(state, items, group, t), self._reach_of(state, group, t), t, lone)))
            if decides:
                count(Stack.PATCHER, len(appends))
            # the one host read of the patch decisions, every round's and row's at once
            read = self._read(torch.cat([f.flatten() for _, f in flags]))
            closing = [[] for _ in rounds]
            at = 0
            for group, f in flags:
                width = f.shape[1]
                for b, p in enumerate(group):
                    if p.row.kind == APPEND:
                        row = read[at + b * width : at + (b + 1) * width]
                        slot = items[p.row.index][0].slot
                        closing[p.offset // largest] += self._extend_starts(starts[p.row.index], slot, p, row)
                        if not row[-1]:
                            failed_entropy.add(p.row.index)
                at += f.numel()
            by_slot = {items[i][0].slot: s for i, s in starts.items()}
            for r, pieces in enumerate(rounds):
                if closing[r]:
                    self._global_pass(state, by_slot, closing[r], lone)
                for t, group in _groups(pieces):
                    results.add(group, *self.graph("decode", self._rows_key(len(group), lone), t, lone)(
                        model, state.buffers, self._descriptor(state, items, group, t), self._reach_of(state, group, t), t, lone))
        closers = {r.index for r in appends if r.index not in failed_entropy
                   and closed_patches(starts[r.index]) > closed_before[r.index]}
        if any(r.kind != DENOISE for r in rows):
            count(Stack.ENCODER, sum(r.kind != DENOISE for r in rows))
        if closers:
            count(Stack.GLOBAL, len(closers))
        count(Stack.DECODER, len(rows))
        # the one host read of the results: which rows came out finite
        return self._finish(state, items, rows, results, failed_entropy, closers, closed_before, starts)

    @staticmethod
    def _extend_starts(starts: list[int], slot: int, piece: "_Piece", flags: list[int]) -> list[tuple[int, int]]:
        """Add the patch starts a piece's close flags decided to ``starts`` (the host's copy, which
        strategies read once the session applies it); returns the (slot, patch index) of every patch that
        closed."""
        first = piece.row.start + piece.offset
        if first == 0:
            starts[:] = [0]
        closed = []
        for step in range(piece.count):
            if flags[step]:
                starts.append(first + step + 1)
                closed.append((slot, len(starts) - 2))
        return closed

    def _global_pass(self, state: StaticState, starts: dict[int, list[int]], patches: list[tuple[int, int]],
                     lone: bool) -> None:
        """The global graph(s) over closed ``patches`` ((slot, patch index); spans known on the host from
        ``starts``, by slot)."""
        largest = max(PATCH_BUCKETS)
        for at in range(0, len(patches), largest):
            part = patches[at : at + largest]
            span = doubling(max(starts[slot][i + 1] - starts[slot][i] for slot, i in part), MIN_SPAN, 4)
            if lone:  # one slot's consecutive patches
                size = bucket(len(part), PATCH_BUCKETS)
                desc = [[part[0][0], part[0][1], len(part)]]
            else:
                size = self._rows_key(len(part), lone)
                desc = [[slot, i] for slot, i in part]
                desc += [[state.scratch, 0]] * (self._padded_rows(len(part), lone) - len(part))
            # the global cache holds one entry per patch: a step reads the live patches only
            reach = self._reach(state, 0, max(i for _, i in part) + 1)
            self.graph("global", size, lone)(self.model, state.buffers, self._rows_tensor(desc, lone), reach, size,
                                             self._span(span), lone)

    def _reach_of(self, state: StaticState, pieces: list["_Piece"], t: int) -> Reach:
        """The reach of a graph over ``pieces`` padded to ``t`` positions: from the earliest position a row's
        window sees to past every row's padded chunk."""
        first = 0 if self._lookback is None else min(p.row.start + p.offset for p in pieces) - self._lookback
        return self._reach(state, first, max(p.row.start + p.offset for p in pieces) + t)

    def _descriptor(self, state: StaticState, items: Items, pieces: list["_Piece"], t: int) -> torch.Tensor:
        lone = state.slots == 1
        desc = [[items[p.row.index][0].slot, p.row.kind, p.offset, p.count, int(p.final),
                 *p.row.ids[p.offset : p.offset + p.count], *[0] * (t - p.count)] for p in pieces]
        desc += [[state.scratch, APPEND, 0, 0, 0, *[0] * t]] * (self._padded_rows(len(pieces), lone) - len(pieces))
        return self._rows_tensor(desc, lone)

    def _finish(self, state: StaticState, items: Items, rows: list[_Row], results: "_Results", failed_entropy: set[int],
                closers: set[int], closed_before: dict[int, int], starts: dict[int, list[int]]) -> list[CallResult]:
        ok = results.finite(self._read)
        model = self.model
        out: list[CallResult] = []
        for r in rows:
            s, c = items[r.index]
            n = len(r.ids)
            passes, events = [], []
            new_starts = tuple(starts[r.index]) if r.kind == APPEND else None
            if r.kind == APPEND and model.patcher.uses_entropy:
                passes.append(Stack.PATCHER)
            if r.index in failed_entropy:
                out.append(CallResult(non_finite("entropy model (patcher)", r.start, r.start + n), tuple(passes),
                                      new_starts))
                self._fail(state, s)
                continue
            if r.kind != DENOISE:
                passes.append(Stack.ENCODER)
            if r.index in closers:
                passes.append(Stack.GLOBAL)
                if s.trace is not None:
                    first = closed_before[r.index]
                    entropies = state.entropy_history(s.slot, r.start + n) if model.patcher.uses_entropy else None
                    events = patches_closed(starts[r.index], first, closed_patches(starts[r.index]) - first, entropies,
                                            model.patcher.threshold)
            passes.append(Stack.DECODER)
            inputs_ok, latents_ok, logits_ok = ok[r.index]
            if not logits_ok:
                output: torch.Tensor | BaseException = diagnosis(inputs_ok, latents_ok, r.start, n)
                self._fail(state, s)
            else:
                output = results.logits(r.index)
            out.append(CallResult(output, tuple(passes), new_starts, tuple(events)))
        return out

    @staticmethod
    def _fail(state: StaticState, session) -> None:
        """A row failed: its device lengths back to the host's, and its slot cleared of non-finite values."""
        state.clear(session.slot)
        state.restore(session.slot, session.length, session.draft_length)


class _Results:
    """The decoder graphs' outputs, per call: logits of each of its pieces, and finite flags."""

    def __init__(self, rows: list[_Row]):
        self._logits: dict[int, list[torch.Tensor]] = {r.index: [] for r in rows}
        self._status: list[tuple[list[_Piece], torch.Tensor]] = []

    def add(self, pieces: list[_Piece], logits: torch.Tensor, status: torch.Tensor) -> None:
        for b, p in enumerate(pieces):
            self._logits[p.row.index].append(logits[b, : p.count])
        self._status.append((pieces, status[: len(pieces)]))

    def logits(self, index: int) -> torch.Tensor:
        parts = self._logits[index]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def finite(self, read: Callable[[torch.Tensor], list]) -> dict[int, list[bool]]:
        """Per call: are its inputs, latents and logits finite, over all its pieces (one host read)."""
        flat = read(torch.cat([status for _, status in self._status]).flatten())
        ok: dict[int, list[bool]] = {}
        at = 0
        for pieces, _ in self._status:
            for p in pieces:
                previous = ok.get(p.row.index, [True, True, True])
                ok[p.row.index] = [a and bool(b) for a, b in zip(previous, flat[at : at + 3])]
                at += 3
        return ok


def _groups(pieces: list[_Piece]) -> list[tuple[int, list[_Piece]]]:
    """Pieces grouped by chunk bucket, each group split to at most the largest row bucket."""
    by_size: dict[int, list[_Piece]] = {}
    for p in pieces:
        by_size.setdefault(bucket(p.count, CHUNK_BUCKETS), []).append(p)
    largest = max(ROW_BUCKETS)
    return [(t, group[at : at + largest]) for t, group in sorted(by_size.items()) for at in range(0, len(group), largest)]


def _renamed(fn: Callable, name: str) -> Callable:
    """``fn`` under its own code object: torch.compile keeps its compiled graphs per code object, so every
    shape bucket gets its own (no guard checks against other buckets' graphs at each call)."""
    code = fn.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


def _markers(reach: Reach, sizes: tuple) -> list[torch.Tensor]:
    """A graph call's marker tensors (the reach's two, then any span marker among ``sizes``): their
    lengths are the call's symbolic sizes."""
    return [*reach, *(s for s in sizes if isinstance(s, torch.Tensor))]


def _signature(buf: Buffers, desc: torch.Tensor, reach: Reach, sizes: tuple) -> tuple:
    """What a graph's guards could tell apart between two calls of one graph: every buffer's shape, the
    descriptor's, and the orders of magnitude of the reach and span markers (symbolic sizes; a guard
    relating one to a fixed size would differ between magnitudes)."""
    shapes = tuple(t.shape if isinstance(t, torch.Tensor) else None if t is None else (t.keys.shape, t.values.shape)
                   for t in buf)
    return shapes, desc.shape, tuple(marker.shape[0].bit_length() for marker in _markers(reach, sizes))


class _Compiled:
    """A compiled graph that reports its first call (the compilation) to the runner's progress, and
    skips dynamo's guard evaluation on calls like one it has already checked.

    Guards cost ~200 us a call here (every parameter and buffer of the model is a guarded input), as
    much as a decoder step's kernels. The runner makes every input itself: a call whose buffers and
    descriptor have the shapes of a call already made with guards checked (and whose reach has the same
    order of magnitude) passes them too, so it runs with ``skip_guard_eval_unsafe`` (dynamo still tells
    apart several compiled versions of one graph, if a guard ever made one)."""

    def __init__(self, fn: Callable, key: tuple, runner: StaticRunner):
        self.fn, self.key, self.runner, self.done = fn, key, runner, False
        self._checked: set[tuple] = set()

    def __call__(self, model: BLTModel, buf: Buffers, desc: torch.Tensor, reach: Reach, *sizes: object) -> object:
        args = (model, buf, desc, reach, *sizes)
        if self.done:
            signature = _signature(buf, desc, reach, sizes)
            if signature in self._checked:
                with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                    return self.fn(*args)
            self._checked.add(signature)
            return self.fn(*args)
        self._checked.add(_signature(buf, desc, reach, sizes))
        began = time.perf_counter()
        result = self.fn(*args)
        seconds = time.perf_counter() - began
        self.done = True
        self.runner.compile_seconds[self.key] = seconds
        if self.runner.progress is not None:
            self.runner.progress(f"compiled {self.key[0]} graph {self.key[1:]} in {seconds:.1f} s")
        return result


class _CudaGraphed:
    """On a CUDA device, a compiled step graph captured as a CUDA graph and replayed.

    A step graph reads and writes the state's buffers in place and reads two small per-call inputs: the
    descriptor (copied into the captured graph's own) and the reach (only its length matters). So one
    capture per state, reach and descriptor shape: the first call runs the compiled graph for real (it
    compiles there), then captures it; later calls copy the descriptor in and replay, with no host
    synchronisation and no allocation. Outputs are cloned: a replay overwrites the captured ones."""

    #: states whose captures are kept (a lone session makes a state of its own; an engine one for its life)
    KEPT_STATES = 4

    def __init__(self, fn: "_Compiled", runner: StaticRunner):
        self.fn, self.runner = fn, runner
        self._captured: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, object]] = {}
        self._states: list[tuple] = []

    @property
    def done(self) -> bool:
        return self.fn.done

    def __call__(self, model: BLTModel, buf: Buffers, desc: torch.Tensor, reach: Reach, *sizes: object) -> object:
        # addresses and shapes: a capture replays raw pointers and sizes
        state = tuple((t.data_ptr(), *t.shape) for t in torch.utils._pytree.tree_leaves(buf))
        key = (state, *(marker.shape[0] for marker in _markers(reach, sizes)), tuple(desc.shape))
        entry = self._captured.get(key)
        stats = self.runner.cuda_graph_stats
        if entry is None:
            result = self.fn(model, buf, desc, reach, *sizes)  # compiles on first use; this call's result
            self._remember(state)
            fixed = desc.clone()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.runner._cuda_pool):
                out = self.fn(model, buf, fixed, reach, *sizes)
            self._captured[key] = (graph, fixed, out)
            stats["captures"] += 1
            return result
        graph, fixed, out = entry
        fixed.copy_(desc, non_blocking=True)
        graph.replay()
        stats["replays"] += 1
        return torch.utils._pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, out)

    def _remember(self, state: tuple) -> None:
        """Keep the captures of the last :attr:`KEPT_STATES` states: a freed state's addresses may be reused."""
        if state in self._states:
            return
        self._states.append(state)
        if len(self._states) > self.KEPT_STATES:
            old = self._states.pop(0)
            self._captured = {k: v for k, v in self._captured.items() if k[0] != old}
