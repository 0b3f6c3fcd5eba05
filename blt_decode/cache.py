"""The one cache type: preallocated keys and values with a length (the gpt-fast way).

Rollback is "set the length back": entries past the length are stale and get overwritten by the next
write. The same buffers serve eager and compiled execution.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every attention layer of one transformer stack, for one sequence."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, capacity: int, *, dtype: torch.dtype, device: torch.device | str):
        shape = (n_layers, 1, n_kv_heads, capacity, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.length = 0

    def write(self, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``keys``/``values`` ([1, heads, T, head_dim]) at ``start`` and return all entries up to the end."""
        end = start + keys.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache overflow: position {end} > capacity {self.capacity}")
        self.keys[layer, :, :, start:end] = keys
        self.values[layer, :, :, start:end] = values
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.capacity:
            raise ValueError(f"cannot truncate a cache of capacity {self.capacity} to {length}")
        self.length = length
