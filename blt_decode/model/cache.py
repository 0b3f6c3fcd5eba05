"""The one cache type: preallocated keys and values for a fixed number of sequence slots (the gpt-fast way;
docs/engine.md)."""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

#: ``repeat_kv(keys, values)``: the attention's own widening of key/value heads to its query heads
RepeatKV = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class AttentionGroup(NamedTuple):
    """Rows of similar length whose attention runs as one [rows, T] grid (see :class:`RowLayout`)."""

    #: [n] indices of the group's positions among the call's packed positions; None: all of them, in order
    members: torch.Tensor | None
    #: [B, 1, T, L] additive attention mask in the model's dtype: 0 where query (b, t) may attend to cache
    #: position j < L of its row's slot, -inf elsewhere (built once per stack call, not once per layer)
    mask: torch.Tensor
    #: [n] index of each of the group's positions in its [B * T] grid; None when every row has T positions
    grid: torch.Tensor | None
    #: [B] slot each row reads; None when the rows are slots 0..B-1 (read as a view, no gather)
    read_slots: torch.Tensor | None

    def to_grid(self, packed: torch.Tensor) -> torch.Tensor:
        """The group's [n, ...] packed values as a [B, T, ...] grid (zeros where a row is shorter than T)."""
        b, t = self.mask.shape[0], self.mask.shape[2]
        if self.grid is None:
            return packed.view(b, t, *packed.shape[1:])
        grid = packed.new_zeros(b * t, *packed.shape[1:]).index_copy_(0, self.grid, packed)
        return grid.view(b, t, *packed.shape[1:])

    def from_grid(self, grid: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] grid values back to the group's [n, ...] packed positions."""
        flat = grid.reshape(-1, *grid.shape[2:])
        return flat if self.grid is None else flat.index_select(0, self.grid)


class RowLayout(NamedTuple):
    """Where the positions of one batched stack call sit in their sequences and in the cache.

    A call carries N positions *packed* one row after another (row b holds ``lengths[b]`` consecutive
    positions of the sequence in one cache slot): every linear layer runs over the N real positions, with
    no padding, however ragged the rows are (a 9-byte verification beside one-byte steps). Attention is
    the one place rows meet their own cache: it lays each group of rows of similar length out as a grid,
    reads each row's keys, and packs the result again; grouping keeps a prompt's prefill from padding
    the attention of one-byte steps to its length. Built by :func:`blt_decode.execution.runner.row_layout`; every
    layer of the stack uses the same layout.
    """

    #: [N] cache slot and [N] position (in its sequence: the rotary position and the cache index) of each
    #: packed position; its keys and values are written there
    slots: torch.Tensor
    positions: torch.Tensor
    #: attention groups (one in the common case of rows of similar length)
    groups: tuple[AttentionGroup, ...]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: "KVCache", layer: int,
               repeat_kv: RepeatKV) -> torch.Tensor:
        """Store the packed keys/values ([N, kv_heads, head_dim]) and return every packed query's attention
        output over its row's cache ([N, heads, head_dim]), group by group."""
        cache.write(layer, self, k, v)
        out = None
        for group in self.groups:
            keys, values = repeat_kv(*cache.read(layer, group))
            grid_q = group.to_grid(q if group.members is None else q.index_select(0, group.members))
            o = group.from_grid(F.scaled_dot_product_attention(grid_q.transpose(1, 2), keys, values,
                                                               attn_mask=group.mask).transpose(1, 2))
            if group.members is None:
                out = o
            else:
                out = (q.new_empty(q.shape) if out is None else out).index_copy_(0, group.members, o)
        assert out is not None
        return out


class GridLayout(NamedTuple):
    """A fixed-shape layout of one stack call (the static runner's): B rows of T positions each, packed
    as N = B * T positions (padding included; padding is computed, written to scratch room and never
    read), each row reading the K entries from ``read_start`` of its slot's cache.

    Every size here is fixed by the call's shape bucket or symbolic (K and ``read_start``, one compiled
    graph for all of them), never read from the data; the mask is a tensor computed on the device."""

    #: [N] cache slot and [N] position of each packed position (its rotary position and where its keys go)
    slots: torch.Tensor
    positions: torch.Tensor
    #: [B] slot each row reads; None: row b reads slot b (a lone sequence: its cache is read as a view)
    read_slots: torch.Tensor | None
    #: the first cache position every row reads (K = the mask's last size from there): one range for all
    #: rows, so a row's entries are read contiguously (a per-row gather of positions runs ~6x slower)
    read_start: int
    #: [B, 1, T, K] additive attention mask in the model's dtype (0 or -inf)
    mask: torch.Tensor

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: "KVCache", layer: int,
               repeat_kv: RepeatKV) -> torch.Tensor:
        """As :meth:`RowLayout.attend`, over the grid: one attention call for every row at once.

        ``cache`` is anything with ``keys``/``values`` buffers ([layers, slots, kv_heads, room, head_dim]).
        Entries a row reads but may not attend to get zero weight; the runner keeps every entry finite
        (see :meth:`blt_decode.execution.static_runner.StaticState.clear`), so they contribute exactly nothing."""
        # a layer index tensor, not an int: writing through cache.keys[layer] (a view) would make the
        # compiled graph copy the whole layer to functionalize the write; this writes in place
        at = (torch.full_like(self.slots, layer), self.slots, slice(None), self.positions)
        cache.keys[at] = k
        cache.values[at] = v
        b, t = self.mask.shape[0], self.mask.shape[2]
        read = slice(self.read_start, self.read_start + self.mask.shape[-1])
        if self.read_slots is None:  # [B, kv_heads, K, head_dim] views
            keys, values = cache.keys[layer, :b, :, read], cache.values[layer, :b, :, read]
        else:  # [B, kv_heads, K, head_dim]: whole slots picked, a compiler fuses the pick into the reads
            keys, values = cache.keys[layer][self.read_slots][:, :, read], cache.values[layer][self.read_slots][:, :, read]
        if t == 1:
            return _attend_one(q, keys, values, self.mask.view(b, -1))
        keys, values = repeat_kv(keys, values)
        grid_q = q.view(b, t, *q.shape[1:]).transpose(1, 2)
        out = F.scaled_dot_product_attention(grid_q, keys, values, attn_mask=self.mask)
        return out.transpose(1, 2).reshape(q.shape)


def _attend_one(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of one query per row (q [B, heads, head_dim]) over keys/values ([B, kv_heads, K,
    head_dim]) under an additive mask [B, K], written as two reductions: a compiler fuses a gather of the
    keys into them instead of copying every row's keys out first (what a matrix-product attention
    needs), and one-query attention is a matrix-vector product anyway. Scores and softmax in at least
    float32, as the fused attention kernels compute them."""
    b, heads, dim = q.shape
    kv_heads = keys.shape[1]
    compute = torch.promote_types(q.dtype, torch.float32)
    grouped = q.view(b, kv_heads, heads // kv_heads, 1, dim).to(compute)
    scores = (grouped * keys[:, :, None].to(compute)).sum(-1) * dim ** -0.5  # [B, kv_heads, group, K]
    weights = torch.softmax(scores + mask[:, None, None].to(compute), dim=-1)
    out = (weights[..., None] * values[:, :, None].to(compute)).sum(-2)  # [B, kv_heads, group, dim]
    return out.reshape(b, heads, dim).to(q.dtype)


class KVCache:
    """Keys and values of every attention layer of one transformer stack, for ``slots`` sequences."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, capacity: int, *, slots: int = 1,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (n_layers, slots, n_kv_heads, capacity, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.slots = slots

    def write(self, layer: int, rows: "RowLayout | GridLayout", keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store the packed ``keys``/``values`` ([N, heads, head_dim]) at their rows' slots and positions."""
        # advanced indices on dims 0 and 2 around a slice: the indexed view is [N, heads, head_dim]
        self.keys[layer][rows.slots, :, rows.positions] = keys
        self.values[layer][rows.slots, :, rows.positions] = values

    def read(self, layer: int, group: AttentionGroup) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row's entries of a group up to its key length L ([B, heads, L, head_dim] each)."""
        length, b = group.mask.shape[-1], group.mask.shape[0]
        if group.read_slots is None:
            return self.keys[layer, :b, :, :length], self.values[layer, :b, :, :length]
        # slice to the keys in use first: an index with a trailing slice would gather the whole capacity
        return (self.keys[layer, :, :, :length].index_select(0, group.read_slots),
                self.values[layer, :, :, :length].index_select(0, group.read_slots))
