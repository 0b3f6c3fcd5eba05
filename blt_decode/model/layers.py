"""Building blocks shared by every stack: RMSNorm, interleaved rotary embeddings, attention, SwiGLU.

Module and parameter names follow the public BLT code (``attention.wq``, ``feed_forward.w1``,
``attention_norm``, ``cross_attn_norm_q``, ...) so checkpoints map one-to-one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from blt_decode.model.cache import KVCache, RowLayout
from blt_decode.model.config import TransformerConfig


class RMSNorm(nn.Module):
    """RMS normalisation over the last axis with a learned scale, computed in at least float32 and returned
    in the input's dtype."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in at least float32, as the reference does, then return the input dtype
        compute = torch.promote_types(x.dtype, torch.float32)
        h = x.to(compute)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * self.weight.to(compute)).to(x.dtype)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, [T, head_dim // 2], for the given positions."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim))
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate *adjacent* channel pairs (BLT's interleaved layout, not Llama's rotate-half). x: [B, H, T, D]."""
    pairs = x.unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


def causal_mask(q_start: int, q_len: int, kv_len: int, window: int | None, device: torch.device) -> torch.Tensor:
    """Boolean [q_len, kv_len] mask: query at position q_start+i sees key j when j <= q and q - j < window."""
    q = torch.arange(q_start, q_start + q_len, device=device)[:, None]
    k = torch.arange(kv_len, device=device)[None, :]
    allowed = k <= q
    if window is not None:
        allowed &= (q - k) < window
    return allowed


class Attention(nn.Module):
    """Self-attention with interleaved rotary embeddings and grouped-query heads (``n_kv_heads`` divides
    ``n_heads``), over full sequences or over packed rows with a KV cache."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
                cache: KVCache | None = None, layer: int = 0, rows: RowLayout | None = None) -> torch.Tensor:
        """x: [B, T, dim] (full sequences, ``mask`` [T, T] or [B, 1, T, T]), or, with ``rows`` and ``cache``,
        [N, dim] packed positions of ragged rows attending to their own cached prefixes."""
        if rows is not None:
            return self._forward_rows(x, rope, cache, layer, rows)
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        k, v = self._repeat_kv(k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))

    def _forward_rows(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache | None,
                      layer: int, rows: RowLayout) -> torch.Tensor:
        assert cache is not None, "a call over rows needs their KV cache"
        n = x.shape[0]
        q = apply_rope(self.wq(x).view(n, self.n_heads, self.head_dim), *rope)
        k = apply_rope(self.wk(x).view(n, self.n_kv_heads, self.head_dim), *rope)
        v = self.wv(x).view(n, self.n_kv_heads, self.head_dim)
        # only attention needs the rows laid out against their cache; the projections run packed
        out = rows.attend(q, k, v, cache, layer, self._repeat_kv)
        return self.wo(out.reshape(n, -1))

    def _repeat_kv(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.n_kv_heads == self.n_heads:
            return k, v
        rep = self.n_heads // self.n_kv_heads
        return k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); w1 = gate, w2 = down, w3 = up."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """One pre-norm layer: ``x + attention(norm(x))``, then ``h + feed_forward(norm(h))``; ``forward`` takes
    :meth:`Attention.forward`'s arguments."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.attention = Attention(cfg.dim, cfg.n_heads, cfg.kv_heads)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, rope, mask, cache=None, layer=0, rows=None):
        h = x + self.attention(self.attention_norm(x), rope, mask, cache, layer, rows)
        return h + self.feed_forward(self.ffn_norm(h))


class TransformerStack(nn.Module):
    """Blocks plus the position bookkeeping shared by all four stacks."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))

    def new_cache(self, capacity: int, *, slots: int = 1, dtype: torch.dtype, device: torch.device) -> KVCache:
        return KVCache(self.cfg.n_layers, self.cfg.kv_heads, self.cfg.head_dim, capacity, slots=slots, dtype=dtype,
                       device=device)

    def run_layers(self, x: torch.Tensor, between=None, *, rows: RowLayout | None = None, cache: KVCache | None = None,
                   mask: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Run every block over x ([B, T, dim]).

        Without ``rows``: the full-sequence forward, x holding positions 0..T-1 under a causal
        (sliding-window) mask; ``positions`` (rotary positions, [T] or [B, T]) and ``mask`` (bool [T, T] or
        [B, T, T], True = may attend) override that for the block-diffusion training layouts. With ``rows``
        and ``cache``: x is [N, dim], the packed positions of ragged rows, each row a chunk of its own
        sequence; keys/values go to the row's cache slot and attention reads that slot under ``rows.mask``
        (see :class:`~blt_decode.model.cache.RowLayout`).
        ``between(i, h)`` runs before block i (the decoder's cross-attention uses it).
        """
        if rows is not None:  # packed positions [N, dim]: rotary tables [N, 1, head_dim/2] broadcast over heads
            cos, sin = rope_tables(rows.positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
            rope, mask = (cos[:, None], sin[:, None]), None  # each attention group carries its own mask
        else:
            b, t = x.shape[:2]
            if mask is None:
                mask = causal_mask(0, t, t, self.cfg.sliding_window, x.device)
            if positions is None:
                positions = torch.arange(t, device=x.device)
            cos, sin = rope_tables(positions.reshape(-1), self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
            if positions.dim() == 2:  # per-row positions: [B, 1, T, head_dim/2], broadcast over heads
                cos, sin = cos.view(b, 1, t, -1), sin.view(b, 1, t, -1)
            rope = (cos, sin)
            if mask.dim() == 3:
                mask = mask[:, None]
        for i, layer in enumerate(self.layers):
            if between is not None:
                x = between(i, x)
            x = layer(x, rope, mask, cache, i, rows)
        return x


class CrossAttention(nn.Module):
    """Cross-attention of the local models (no rotary; RMSNorm on queries and on keys/values).

    Quirk kept from the released code: the output already adds the query input back
    (``wo(attn) + x``) and callers add x again, so the update is ``2·x + wo(attn)``.
    """

    def __init__(self, dim: int, n_heads: int, norm_eps: float):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.cross_attn_norm_q = RMSNorm(dim, norm_eps)
        self.cross_attn_norm_kv = RMSNorm(dim, norm_eps)
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, kv_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: [N, Q, dim] queries; kv: [N, S, dim]; each of the N groups attends only to its own S keys.

        kv_mask ([N, S], bool) marks valid keys; a group with no valid key gets a zero attention output.
        """
        n, q_len, _ = x.shape
        s = kv.shape[1]
        q = self.wq(self.cross_attn_norm_q(x)).view(n, q_len, self.n_heads, self.head_dim).transpose(1, 2)
        kvn = self.cross_attn_norm_kv(kv)
        k = self.wk(kvn).view(n, s, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.wv(kvn).view(n, s, self.n_heads, self.head_dim).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)) * self.head_dim ** -0.5  # [N, H, Q, S]
        if kv_mask is not None:
            scores = scores.masked_fill(~kv_mask[:, None, None, :], float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        if kv_mask is not None:
            weights = weights.nan_to_num(0.0)  # groups without keys (empty patches)
        out = (weights @ v).transpose(1, 2).reshape(n, q_len, -1)
        return self.wo(out) + x
