"""Hash n-gram ids for the local encoder's hash embeddings, computed exactly as the public BLT code does.

For group size n and hash function f, the id sequence is left-padded with n-1 zeros; every window of n ids
(w_0 .. w_{n-1}, oldest first) is hashed as ``sum_j w_j * p_f**j`` in int64 arithmetic that wraps on
overflow, and the result is reduced modulo the bucket count with a non-negative remainder.
"""

from __future__ import annotations

import torch

#: Base primes of the hash functions, in the order the public code lists them.
HASH_PRIMES = (
    1000000007,
    5915587277,
    1500450271,
    3267000013,
    5754853343,
    4093082899,
    9576890767,
    3628273133,
    2860486313,
    5463458053,
    3367900313,
)


def _wrap_int64(value: int) -> int:
    """Python int reduced to the int64 value that two's-complement wrapping would give."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def prime_powers(prime: int, group_size: int) -> list[int]:
    """``prime**j`` for j < group_size, wrapped to int64 like torch's int64 arithmetic."""
    return [_wrap_int64(pow(prime, j, 1 << 64)) for j in range(group_size)]


def hash_windows(windows: torch.Tensor, prime: int, buckets: int) -> torch.Tensor:
    """Bucket ids of n-gram windows ``windows`` ([..., n], oldest id first): ``sum_j w_j * prime**j`` in
    wrapping int64 arithmetic, reduced with a non-negative remainder."""
    powers = torch.tensor(prime_powers(prime, windows.shape[-1]), dtype=torch.int64, device=windows.device)
    # int64 multiply and add wrap on overflow, as in the reference implementation
    return torch.remainder((windows.to(torch.int64) * powers).sum(dim=-1), buckets)


def ngram_hash_ids(ids: torch.Tensor, group_size: int, prime: int, buckets: int) -> torch.Tensor:
    """Bucket ids, shape like ``ids`` ([..., T]), of the n-gram ending at each position."""
    ids = ids.to(torch.int64)
    pad = torch.zeros(*ids.shape[:-1], group_size - 1, dtype=torch.int64, device=ids.device)
    windows = torch.cat([pad, ids], dim=-1).unfold(-1, group_size, 1)  # [..., T, n]
    return hash_windows(windows, prime, buckets)


def hash_table_ids(ids: torch.Tensor, group_sizes: tuple[int, ...], n_functions: int, buckets: int) -> list[torch.Tensor]:
    """One bucket-id tensor per (function, group size) table, in the public code's table order."""
    out = []
    for f in range(n_functions):
        prime = HASH_PRIMES[f % len(HASH_PRIMES)]
        for n in group_sizes:
            out.append(ngram_hash_ids(ids, n, prime, buckets))
    return out


def hash_table_ids_of_windows(windows: torch.Tensor, group_sizes: tuple[int, ...], n_functions: int,
                              buckets: int) -> list[torch.Tensor]:
    """Like :func:`hash_table_ids` for the n-grams ending at chosen positions: ``windows`` [..., m] holds
    the m >= max(group_sizes) ids up to and including each position, oldest first (zeros before the
    sequence start, as the reference pads)."""
    out = []
    for f in range(n_functions):
        prime = HASH_PRIMES[f % len(HASH_PRIMES)]
        for n in group_sizes:
            out.append(hash_windows(windows[..., windows.shape[-1] - n:], prime, buckets))
    return out
