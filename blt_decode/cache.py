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


class RowLayout(NamedTuple):
    """Where the rows of one batched stack call sit in the cache and in their sequences.

    Row b holds ``valid[b].sum()`` real positions (the rest is padding up to T). Built by the session
    (:func:`blt_decode.session.row_layout`); every layer of the stack uses the same layout.
    """

    #: [B, T] rotary position of each query
    positions: torch.Tensor
    #: [B, 1, T, L] additive attention mask in the model's dtype: 0 where query (b, t) may attend to cache
    #: position j < L of its own slot, -inf elsewhere (built once per stack call, not once per layer)
    mask: torch.Tensor
    #: [N] slot and [N] cache position where the keys/values of the N real positions go
    write_slots: torch.Tensor
    write_positions: torch.Tensor
    #: [N] indices of the real positions in the flattened [B * T] chunk; None when nothing is padding
    real: torch.Tensor | None
    #: [B] slot each row reads; None when the rows are slots 0..B-1 (read as a view, no gather)
    read_slots: torch.Tensor | None


class KVCache:
    """Keys and values of every attention layer of one transformer stack, for ``slots`` sequences."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, capacity: int, *, slots: int = 1,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (n_layers, slots, n_kv_heads, capacity, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.slots = slots

    def write(self, layer: int, rows: RowLayout, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``keys``/``values`` ([B, heads, T, head_dim]) of the rows' real positions and return every
        row's entries up to the layout's key length L ([B, heads, L, head_dim] each)."""
        b, heads, t, d = keys.shape
        for buffer, new in ((self.keys[layer], keys), (self.values[layer], values)):
            flat = new.transpose(1, 2).reshape(b * t, heads, d)
            if rows.real is not None:
                flat = flat.index_select(0, rows.real)
            # advanced indices on dims 0 and 2 around a slice: the indexed view is [N, heads, head_dim]
            buffer[rows.write_slots, :, rows.write_positions] = flat
        length = rows.mask.shape[-1]
        if rows.read_slots is None:
            return self.keys[layer, :b, :, :length], self.values[layer, :b, :, :length]
        # slice to the keys in use first: an index with a trailing slice would gather the whole capacity
        return (self.keys[layer, :, :, :length].index_select(0, rows.read_slots),
                self.values[layer, :, :, :length].index_select(0, rows.read_slots))
