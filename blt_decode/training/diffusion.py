"""The BLT-D training forward: the clean sequence through encoder, global model and decoder, plus the
corrupted blocks through the decoder, for a whole batch at once (docs/training.md, "The objective").

Every layer runs its matrix products once over all clean positions and all blocks of the batch; the
clean/block attention pattern (:func:`block_attention_mask`) is evaluated as fused attention kernels
over the keys each query may see, never as a dense score matrix (:class:`BlockAttention`).
"""

from __future__ import annotations

import functools
from typing import Sequence

import attrs
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from blt_decode.model.blt import BLTModel, PatchLayout
from blt_decode.model.layers import CrossAttention, apply_rope, causal_mask, rope_tables
from blt_decode.model.tokenizer import PAD_ID


def block_attention_mask(clean_len: int, blocks: Sequence[tuple[int, int]], window: int | None, *,
                         total: int | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean [L, L] self-attention mask of the training layout: ``clean_len`` clean positions followed
    by the blocks ``(start, size)`` one after another, then padding up to ``total`` rows (L = total).

    The definition of the pattern (tests check the fast forward against it): clean rows are causal
    (sliding window); block rows see clean positions before their start (window measured from the block
    position's original byte position) and their own block, never another block; padding rows see only
    themselves (so no row is empty). Clean rows never see a block.
    """
    n_block = sum(size for _, size in blocks)
    length = clean_len + n_block if total is None else total
    if length < clean_len + n_block:
        raise ValueError(f"total {total} is shorter than the layout ({clean_len} clean + {n_block} block positions)")
    qpos = torch.zeros(length, dtype=torch.long)
    limit = torch.zeros(length, dtype=torch.long)  # clean keys j < limit are visible (before the window)
    group = -torch.arange(2, length + 2)  # unique negatives: padding rows form their own group
    qpos[:clean_len] = torch.arange(clean_len)
    limit[:clean_len] = torch.arange(1, clean_len + 1)
    group[:clean_len] = -1
    row = clean_len
    for index, (start, size) in enumerate(blocks):
        if not 0 < start <= clean_len:
            raise ValueError(f"block start {start} outside 1..{clean_len}")
        qpos[row : row + size] = torch.arange(start, start + size)
        limit[row : row + size] = start
        group[row : row + size] = index
        row += size
    k = torch.arange(clean_len)
    clean = k[None, :] < limit[:, None]
    if window is not None:
        clean &= (qpos[:, None] - k[None, :]) < window
    same = group[:, None] == group[None, clean_len:]
    return torch.cat([clean, same], dim=1).to(device)


def block_input_ids(block_starts: Sequence[int], block_size: int, ids: Sequence[int]) -> list[int]:
    """Clean block contents (PAD past the end) for ``block_starts`` of one sequence, concatenated."""
    out = []
    for s in block_starts:
        chunk = list(ids[s : s + block_size])
        out.extend(chunk + [PAD_ID] * (block_size - len(chunk)))
    return out


@attrs.frozen
class DiffusionOutput:
    """What :func:`diffusion_forward` returns: the clean sequence's logits, the blocks' logits, and the patch
    layout it used."""

    clean_logits: torch.Tensor  #: [N, T, vocab]: next-byte logits of the clean sequence
    block_logits: torch.Tensor  #: [N, nb * B, vocab]: logits of the byte AT each block position
    layout: PatchLayout


_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


class BlockAttention(torch.autograd.Function):
    """Block queries attending to their row's clean keys (under a mask) and to their own block, with one
    softmax over both key sets: the clean part as a fused flash-attention call, the own-block part as
    small batched matrix products, merged by their log-sum-exps.

    A dense mask over [clean ; all blocks] would score every block against every other block (nb² B²
    scores per row, all but nb B² of them masked); here the clean part costs nb B x T and the own-block
    part nb B². The backward pass is exact: flash attention's backward over the clean keys, given the
    merged output and log-sum-exp, is the gradient of the merged softmax restricted to those keys.

    Shapes: q [N, H, nb*B, hd] (block queries), clean_k/clean_v [N, H, T, hd], block_k/block_v
    [N, H, nb*B, hd], clean_mask [N, 1, nb*B, T] additive (0 or -inf, the dtype of q), has_clean
    [N, 1, nb*B] bool (False where a row sees no clean key: a block longer than the window, a padding
    block). Returns [N, H, nb*B, hd].
    """

    @staticmethod
    def forward(ctx, q, clean_k, clean_v, block_k, block_v, clean_mask, has_clean, block_size: int, scale: float):
        out_c, lse_c = _flash(q, clean_k, clean_v, attn_mask=clean_mask, scale=scale)
        # the kernel gives a row without visible keys lse 0; its clean part must weigh nothing
        lse_c = lse_c.masked_fill(~has_clean, float("-inf"))
        acc = torch.promote_types(q.dtype, torch.float32)
        qb, kb, vb = (_per_block(x, block_size) for x in (q, block_k, block_v))
        scores = (qb @ kb.transpose(-1, -2)).to(acc) * scale  # [N*nb, H, B, B]
        lse_b = _from_blocks(torch.logsumexp(scores, -1)[..., None], lse_c.shape + (1,))[..., 0]
        lse = torch.logaddexp(lse_c.to(acc), lse_b)
        probs = (scores - _per_block(lse[..., None], block_size)).exp()  # normalised over both key sets
        out_b = _from_blocks(probs.to(q.dtype) @ vb, q.shape)
        out = (out_c.to(acc) * (lse_c - lse).exp()[..., None] + out_b.to(acc)).to(q.dtype)
        lse = lse.to(lse_c.dtype)
        ctx.save_for_backward(q, clean_k, clean_v, block_k, block_v, clean_mask, out, lse, probs)
        ctx.block_size, ctx.scale = block_size, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, clean_k, clean_v, block_k, block_v, clean_mask, out, lse, probs = ctx.saved_tensors
        bs, scale = ctx.block_size, ctx.scale
        grad_out = grad_out.contiguous()
        dq, dk_c, dv_c = _flash_backward(grad_out, q, clean_k, clean_v, out, lse, 0.0, False,
                                         attn_mask=clean_mask, scale=scale)
        # own block: dS = P (dP - D), D = rowsum(dO * O) over the merged output
        acc = probs.dtype
        d_out = _per_block(grad_out, bs)
        row_dot = _per_block((grad_out.to(acc) * out.to(acc)).sum(-1, keepdim=True), bs)
        d_probs = (d_out @ _per_block(block_v, bs).transpose(-1, -2)).to(acc)
        d_scores = (probs * (d_probs - row_dot) * scale).to(q.dtype)
        dq_b = d_scores @ _per_block(block_k, bs)
        dk_b = d_scores.transpose(-1, -2) @ _per_block(q, bs)
        dv_b = probs.to(q.dtype).transpose(-1, -2) @ d_out
        shape = q.shape
        return (dq + _from_blocks(dq_b, shape), dk_c, dv_c, _from_blocks(dk_b, shape), _from_blocks(dv_b, shape),
                None, None, None, None)


def _per_block(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """[N, H, nb*B, d] -> [N*nb, H, B, d]: each block its own batch entry."""
    n, h, length, d = x.shape
    nb = length // block_size
    return x.reshape(n, h, nb, block_size, d).transpose(1, 2).reshape(n * nb, h, block_size, d)


def _from_blocks(x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The inverse of :func:`_per_block` (``shape`` = [N, H, nb*B, d])."""
    n, h, length, d = shape
    nb = x.shape[0] // n
    return x.reshape(n, nb, h, -1, d).transpose(1, 2).reshape(n, h, length, d)


def _decoder_layer(decoder: nn.Module, i: int, h: torch.Tensor, slots: torch.Tensor, lat_index: torch.Tensor,
                   t: int, block_size: int, cos: torch.Tensor, sin: torch.Tensor, clean_mask: torch.Tensor | None,
                   block_mask: torch.Tensor, has_clean: torch.Tensor) -> torch.Tensor:
    """Decoder layer ``i`` over h = [clean ; blocks] ([N, T + nb*B, d]): cross-attention to the latent
    each position reads, then the transformer block. Every projection runs once over all positions (the
    query/key/value and the gate/up weights as one product each); clean queries attend causally to
    clean keys (``clean_mask`` [T, T], None = plain causal), block queries through
    :class:`BlockAttention` (``block_mask``/``has_clean`` as it takes them)."""
    if i < len(decoder.cross_attn_layers):
        h = h + _latent_cross_attention(decoder.cross_attn_layers[i], h, slots, lat_index)
    layer = decoder.layers[i]
    attn, ff = layer.attention, layer.feed_forward
    n, length, _ = h.shape
    heads, kv_heads, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
    qkv = F.linear(layer.attention_norm(h), torch.cat([attn.wq.weight, attn.wk.weight, attn.wv.weight]))
    q, k, v = qkv.split([heads * hd, kv_heads * hd, kv_heads * hd], dim=-1)
    q = apply_rope(q.view(n, length, heads, hd).transpose(1, 2), cos, sin)
    k = apply_rope(k.view(n, length, kv_heads, hd).transpose(1, 2), cos, sin)
    # attention in the dtype the rotary embedding gives q and k (see diffusion_forward)
    k, v = attn._repeat_kv(k, v.view(n, length, kv_heads, hd).transpose(1, 2).to(q.dtype))
    qc, kc, vc = q[:, :, :t], k[:, :, :t], v[:, :, :t]
    out_clean = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=clean_mask, is_causal=clean_mask is None)
    scale = hd ** -0.5
    if q.device.type == "cpu":
        out_block = BlockAttention.apply(q[:, :, t:], kc, vc, k[:, :, t:], v[:, :, t:], block_mask, has_clean,
                                         block_size, scale)
    else:  # the fused flash kernels BlockAttention uses are CPU kernels
        out_block = _block_attention_dense(q[:, :, t:], kc, vc, k[:, :, t:], v[:, :, t:], block_mask, block_size, scale)
    out = torch.cat([out_clean, out_block], dim=2).transpose(1, 2).reshape(n, length, -1)
    h = h + attn.wo(out)
    gate, up = F.linear(layer.ffn_norm(h), torch.cat([ff.w1.weight, ff.w3.weight])).chunk(2, dim=-1)
    return h + ff.w2(F.silu(gate) * up)


def _block_attention_dense(q, clean_k, clean_v, block_k, block_v, clean_mask, block_size: int, scale: float):
    """:class:`BlockAttention` as one SDPA call per row group over [clean keys ; own block] (for devices
    without the CPU flash kernels): block keys are laid out per block, so no block sees another."""
    n, h, lb, d = q.shape
    nb = lb // block_size
    t = clean_k.shape[2]
    # per block: keys = the row's clean keys, then the block's own keys
    qb = _per_block(q, block_size)
    keys = torch.cat([clean_k.repeat_interleave(nb, dim=0), _per_block(block_k, block_size)], dim=2)
    values = torch.cat([clean_v.repeat_interleave(nb, dim=0), _per_block(block_v, block_size)], dim=2)
    mask = _per_block(clean_mask.expand(n, 1, lb, t), block_size)
    mask = torch.cat([mask, mask.new_zeros(n * nb, 1, block_size, block_size)], dim=-1)
    out = F.scaled_dot_product_attention(qb, keys, values, attn_mask=mask, scale=scale)
    return _from_blocks(out, q.shape)


#: with compile_decoder, the block count and the latent count of a batch are rounded up to multiples of
#: this, so that a few static shapes cover every batch (each shape compiles once; see docs/training.md)
COMPILE_BUCKET = 32
#: the most graphs ``--compile`` keeps for the decoder layer function (layers x block sizes x buckets)
COMPILE_GRAPH_LIMIT = 256


@functools.cache
def _compiled_decoder_layer(index: int):
    # static shapes: inductor's kernels for them measured 1.6x eager here, dynamic ones no faster. Every
    # (layer, block size, block bucket, latent bucket) is a graph of its own, more than dynamo's default
    # limit of 8 per function, so the limit is raised while it runs rather than failing the run.
    compiled = torch.compile(_decoder_layer, dynamic=False, fullgraph=True)

    def run(*args):
        with torch._dynamo.config.patch(recompile_limit=COMPILE_GRAPH_LIMIT):
            return compiled(*args)

    return run


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _latent_cross_attention(cross: CrossAttention, h: torch.Tensor, slots: torch.Tensor, lat_index: torch.Tensor) -> torch.Tensor:
    """``cross(h, slots of the latent each position reads)`` for h [N, L, d], slots [N, P, k, d] and
    lat_index [N, L]: keys and values are computed once per latent and gathered, not once per position.
    Returns ``wo(attn) + h`` like :class:`~blt_decode.model.layers.CrossAttention` (the caller adds h again)."""
    n, length, dim = h.shape
    heads, hd = cross.n_heads, cross.head_dim
    k_slots = slots.shape[2]
    kvn = cross.cross_attn_norm_kv(slots)
    keys, values = cross.wk(kvn), cross.wv(kvn)  # [N, P, k, d]
    gather = lat_index[:, :, None, None].expand(-1, -1, k_slots, dim)
    keys = keys.gather(1, gather).view(n, length, k_slots, heads, hd)
    values = values.gather(1, gather).view(n, length, k_slots, heads, hd)
    q = cross.wq(cross.cross_attn_norm_q(h)).view(n, length, heads, hd)
    scores = torch.einsum("nlhd,nlkhd->nlhk", q, keys) * hd ** -0.5
    weights = torch.softmax(scores, dim=-1)
    out = torch.einsum("nlhk,nlkhd->nlhd", weights, values).reshape(n, length, dim)
    return cross.wo(out) + h


def _summarize_spans(model: BLTModel, states: torch.Tensor, begins: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Patch vectors [P, k*dim] of the patches states[begins[j] : begins[j] + lengths[j]] (states [rows, dim]).

    Entropy patches are short on average (~4.5 bytes) but a few run long (whitespace), so padding them all
    to the longest would compute the pooling and slot cross-attention over mostly padding (77 slots for a
    mean of 4.5 in a typical batch). Patches run in buckets of lengths up to 4, 8, 16, ...; gathering
    with index_select keeps the backward an index_add rather than index_put's slow accumulation."""
    out: torch.Tensor | None = None
    bound = 4
    remaining = torch.ones(len(lengths), dtype=torch.bool)
    while remaining.any():
        chosen = remaining & (lengths <= bound)
        remaining &= ~chosen
        bound *= 2
        if not chosen.any():
            continue
        which = chosen.nonzero()[:, 0]
        longest = int(lengths[which].max())
        offsets = torch.arange(longest)
        valid = offsets[None, :] < lengths[which, None]
        index = torch.where(valid, begins[which, None] + offsets[None, :], 0).to(states.device)
        patch_states = states.index_select(0, index.flatten()).view(len(which), longest, states.shape[-1])
        part = model.local_encoder.summarize(patch_states, valid.to(states.device))
        if out is None:
            out = part.new_zeros(len(lengths), part.shape[-1])
        out = out.index_copy(0, which.to(states.device), part)
    assert out is not None
    return out


def diffusion_forward(model: BLTModel, ids: torch.Tensor, block_starts: Sequence[Sequence[int]], block_size: int,
                      block_ids: torch.Tensor, layout: PatchLayout | None = None, *,
                      checkpoint_decoder: bool = False, compile_decoder: bool = False) -> DiffusionOutput:
    """The BLT-D training forward over a batch: the clean sequence ``ids`` ([N, T], BOS first) through
    encoder, global model and decoder, plus corrupted blocks through the decoder only.

    ``block_starts[r]`` lists row r's block starts (patch starts, > 0); every block has ``block_size``
    positions; ``block_ids`` ([N, nb * B], nb = the most blocks of any row) holds each row's noisy block
    ids one block after another (rows with fewer blocks are padded with whole PAD blocks, whose logits
    are meaningless and must carry no loss). The layout (patch starts) is computed if not given. The
    attention pattern is :func:`block_attention_mask`'s. ``checkpoint_decoder`` recomputes each decoder
    layer in the backward pass instead of keeping its activations (training memory; the decoder runs
    over the clean bytes *and* the blocks). ``compile_decoder`` runs the decoder layers through
    ``torch.compile`` with static shapes, the block and latent counts rounded up to
    :data:`COMPILE_BUCKET` (they change from batch to batch).
    """
    n, t = ids.shape
    device = ids.device
    layout = layout or model.patch_layout(ids)
    cfg = model.config
    nb = max((len(b) for b in block_starts), default=0)
    if block_ids.shape != (n, nb * block_size):
        raise ValueError(f"block_ids has shape {tuple(block_ids.shape)}, expected {(n, nb * block_size)}")
    byte_states = model.local_encoder(model.embed(ids))  # [N, T, d]
    dim = byte_states.shape[-1]

    # patch vectors of every row: one summarize call per patch-length bucket
    spans = torch.tensor([(r, s, e) for r, starts in enumerate(layout.starts) for s, e in zip(starts[:-1], starts[1:])])
    vectors = _summarize_spans(model, byte_states.reshape(n * t, dim), spans[:, 0] * t + spans[:, 1],
                               spans[:, 2] - spans[:, 1])
    n_patches = max(len(s) - 1 for s in layout.starts)
    rows = spans[:, 0].to(device)
    cols = torch.tensor([j for starts in layout.starts for j in range(len(starts) - 1)], device=device)
    patch_vectors = vectors.new_zeros(n, n_patches, vectors.shape[-1]).index_put((rows, cols), vectors)
    latents = model.global_transformer(patch_vectors)  # [N, P, global_dim]

    # decoder layout: clean positions, then the blocks; per-row positions and latents (compiled: whole PAD
    # blocks up to the bucket, which see only themselves and whose logits are dropped)
    nb_run = _round_up(nb, COMPILE_BUCKET) if compile_decoder else nb
    if nb_run > nb:
        block_ids = torch.cat([block_ids, block_ids.new_full((n, (nb_run - nb) * block_size), PAD_ID)], dim=1)
    lb = nb_run * block_size
    length = t + lb
    positions = torch.zeros(n, length, dtype=torch.long)
    lat_index = torch.zeros(n, length, dtype=torch.long)
    limit = torch.zeros(n, lb, dtype=torch.long)  # a block position sees clean keys j < its block's start
    offsets = torch.arange(block_size)
    for r, starts in enumerate(layout.starts):
        starts_t = torch.tensor(starts)
        positions[r, :t] = torch.arange(t)
        lat_index[r, :t] = torch.searchsorted(starts_t, torch.arange(1, t + 1), right=True) - 2
        row_starts = torch.tensor(list(block_starts[r]), dtype=torch.long)
        if len(row_starts) == 0:
            continue
        if not bool(((row_starts > 0) & (row_starts < t)).all()):
            raise ValueError(f"row {r}: block starts {list(block_starts[r])} outside 1..{t - 1}")
        nr = len(row_starts) * block_size
        positions[r, t : t + nr] = (row_starts[:, None] + offsets[None, :]).flatten()
        # block_latent_index(starts, s) = latent_index(starts, s - 1), vectorised
        lat_index[r, t : t + nr] = (torch.searchsorted(starts_t, row_starts, right=True) - 2).repeat_interleave(block_size)
        limit[r, :nr] = row_starts.repeat_interleave(block_size)
    window = cfg.decoder.sliding_window
    positions, lat_index, limit = positions.to(device), lat_index.to(device), limit.to(device)
    keys = torch.arange(t, device=device)
    visible = keys < limit[:, :, None]  # comparisons only: no [N, nb*B, T] integer intermediate
    if window is not None:  # block position p sees clean key j when p - j < window
        visible &= keys > (positions[:, t:] - window)[:, :, None]
    has_clean = visible.any(-1)[:, None]
    # queries and keys leave the rotary embedding in the residual stream's dtype (float32 under bfloat16
    # autocast: attention stays in float32, where this CPU's flash kernels are also faster), and the
    # additive mask must have their dtype
    block_mask = torch.where(visible[:, None], torch.zeros((), dtype=byte_states.dtype, device=device), float("-inf"))
    clean_mask = None if window is None or window >= t else causal_mask(0, t, t, window, device)

    decoder = model.local_decoder
    h = torch.cat([byte_states, model.local_encoder.tok_embeddings(block_ids).to(byte_states.dtype)], dim=1)
    # project each latent once (a row-wise map: the same as projecting it at every position reading it)
    slots = decoder.patch_embedding_projection(latents).view(n, latents.shape[1], decoder.k, dim)
    if compile_decoder:  # latents no position reads, up to the bucket
        slots = F.pad(slots, (0, 0, 0, 0, 0, _round_up(slots.shape[1], COMPILE_BUCKET) - slots.shape[1]))
    cos, sin = rope_tables(positions.reshape(-1), decoder.cfg.head_dim, decoder.cfg.rope_theta, h.dtype)
    cos, sin = cos.view(n, 1, length, -1), sin.view(n, 1, length, -1)
    for i in range(len(decoder.layers)):
        layer_fn = _compiled_decoder_layer(i) if compile_decoder else _decoder_layer
        args = (decoder, i, h, slots, lat_index, t, block_size, cos, sin, clean_mask, block_mask, has_clean)
        if checkpoint_decoder and torch.is_grad_enabled():
            h = torch.utils.checkpoint.checkpoint(layer_fn, *args, use_reentrant=False)
        else:
            h = layer_fn(*args)
    logits = decoder.output(decoder.norm(h))
    return DiffusionOutput(logits[:, :t], logits[:, t : t + nb * block_size], layout)
