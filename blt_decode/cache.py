"""The one cache type: preallocated keys and values for a fixed number of sequence slots (the gpt-fast way).

A :class:`KVCache` holds every attention layer of one transformer stack for ``slots`` sequences at once
(one slot for a lone :class:`~blt_decode.session.DecodeSession`, one per admitted request in the batched
:class:`~blt_decode.engine.Engine`). Entries carry no length of their own: a sequence's length lives in its
session, attention reads only positions below it, and rollback is "set the length back" (entries past it
are stale and get overwritten by the next write). The same buffers serve eager and compiled execution.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


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
    the attention of one-byte steps to its length. Built by :func:`blt_decode.session.row_layout`; every
    layer of the stack uses the same layout.
    """

    #: [N] cache slot and [N] position (in its sequence: the rotary position and the cache index) of each
    #: packed position; its keys and values are written there
    slots: torch.Tensor
    positions: torch.Tensor
    #: attention groups (one in the common case of rows of similar length)
    groups: tuple[AttentionGroup, ...]


class KVCache:
    """Keys and values of every attention layer of one transformer stack, for ``slots`` sequences."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, capacity: int, *, slots: int = 1,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (n_layers, slots, n_kv_heads, capacity, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.slots = slots

    def write(self, layer: int, rows: RowLayout, keys: torch.Tensor, values: torch.Tensor) -> None:
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
