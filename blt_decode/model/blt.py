"""The BLT model: hash embeddings, local encoder, patch summary, global transformer, local decoder and
the entropy model that patches the bytes (docs/concepts.md)."""

from __future__ import annotations

import bisect
from typing import Sequence

import attrs
import torch
from torch import nn

from blt_decode.model.cache import KVCache, RowLayout
from blt_decode.model.config import BLTConfig, TransformerConfig
from blt_decode.model.hashing import hash_table_ids, hash_table_ids_of_windows
from blt_decode.model.layers import CrossAttention, RMSNorm, TransformerStack
from blt_decode.model.patching import Patcher, entropy_of_logits
from blt_decode.model.stacks import Stack, per_stack


class EntropyModel(TransformerStack):
    """The small byte-level LM whose next-byte entropies decide patch boundaries."""

    def __init__(self, cfg: TransformerConfig, vocab_size: int):
        super().__init__(cfg)
        self.tok_embeddings = nn.Embedding(vocab_size, cfg.dim)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, vocab_size, bias=False)

    def forward(self, ids: torch.Tensor, rows: RowLayout | None = None, cache: KVCache | None = None) -> torch.Tensor:
        h = self.run_layers(self.tok_embeddings(ids), rows=rows, cache=cache)
        return self.output(self.norm(h))


class LocalEncoder(TransformerStack):
    """Bytes (with hash n-gram embeddings) to byte states, and closed patches to patch vectors."""

    def __init__(self, cfg: TransformerConfig, config: BLTConfig):
        super().__init__(cfg)
        self.k = config.cross_attn_k
        self.tok_embeddings = nn.Embedding(config.vocab_size, cfg.dim)
        self.patch_embedding_projection = nn.Linear(cfg.dim, cfg.dim * self.k, bias=False)
        self.cross_attn_layers = nn.ModuleList([CrossAttention(cfg.dim, config.cross_heads, cfg.norm_eps)])

    def forward(self, embeds: torch.Tensor, rows: RowLayout | None = None, cache: KVCache | None = None) -> torch.Tensor:
        return self.run_layers(embeds, rows=rows, cache=cache)

    def summarize(self, patch_states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Patch vectors [N, k*dim] from the byte states of N patches ([N, L, dim], padded; mask [N, L]).

        Max-pool the bytes of each patch, project to k slots, and let the slots cross-attend to the
        patch's own bytes (the released configuration: pooling init, cross-attention after the last layer).
        """
        n, _, dim = patch_states.shape
        pooled = patch_states.masked_fill(~mask[..., None], float("-inf")).amax(dim=1)
        pooled = torch.where(mask.any(1, keepdim=True), pooled, torch.zeros_like(pooled))
        slots = self.patch_embedding_projection(pooled).view(n, self.k, dim)
        slots = slots + self.cross_attn_layers[0](slots, patch_states, mask)
        return slots.reshape(n, self.k * dim)


class GlobalTransformer(TransformerStack):
    """The large causal transformer over patch vectors; runs once per closed patch."""

    def __init__(self, cfg: TransformerConfig, input_dim: int):
        super().__init__(cfg)
        self.token_embedding_projection = nn.Linear(input_dim, cfg.dim, bias=False) if input_dim != cfg.dim else None

    def forward(self, patch_vectors: torch.Tensor, rows: RowLayout | None = None, cache: KVCache | None = None) -> torch.Tensor:
        h = patch_vectors
        if self.token_embedding_projection is not None:
            h = self.token_embedding_projection(h)
        return self.run_layers(h, rows=rows, cache=cache)


class LocalDecoder(TransformerStack):
    """Byte states + the latent of the previous patch to next-byte logits."""

    def __init__(self, cfg: TransformerConfig, config: BLTConfig):
        super().__init__(cfg)
        self.k = config.cross_attn_k
        n_cross = cfg.n_layers if config.cross_attn_all_layers_decoder else min(1, cfg.n_layers)
        self.patch_embedding_projection = nn.Linear(config.global_.dim, cfg.dim * self.k, bias=False)
        self.cross_attn_layers = nn.ModuleList(CrossAttention(cfg.dim, config.cross_heads, cfg.norm_eps) for _ in range(n_cross))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, config.vocab_size, bias=False)

    def forward(self, byte_states: torch.Tensor, latents: torch.Tensor, rows: RowLayout | None = None,
                cache: KVCache | None = None, *, mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """byte_states [B, T, dim] (or [N, dim] packed positions, with ``rows``); latents [..., global_dim],
        the latent each position reads. ``mask``/``positions`` override the causal layout (see
        :meth:`TransformerStack.run_layers`)."""
        dim = byte_states.shape[-1]
        positions_n = byte_states.numel() // dim
        slots = self.patch_embedding_projection(latents).view(positions_n, self.k, dim)

        def cross(i: int, h: torch.Tensor) -> torch.Tensor:
            if i >= len(self.cross_attn_layers):
                return h
            out = self.cross_attn_layers[i](h.reshape(positions_n, 1, dim), slots).view(h.shape)
            return h + out

        h = self.run_layers(byte_states, cross, rows=rows, cache=cache, mask=mask, positions=positions)
        return self.output(self.norm(h))


#: stacks whose byte embedding table is read by rows, not whole, and so is not counted
EMBEDDED = (Stack.PATCHER, Stack.ENCODER)

ParamCounts = per_stack("ParamCounts", "Parameters read per forward pass of each stack (embedding tables "
                        "excluded: only their rows are read); fields named by ``Stack.attr``.", __name__)


@attrs.frozen
class PatchLayout:
    """Patch starts of each sequence of a batch, as the reference forward computed them."""

    starts: tuple[tuple[int, ...], ...]
    entropies: torch.Tensor | None


def latent_index(starts: Sequence[int], position: int) -> int:
    """Index of the latent that the decoder reads at ``position`` (the alignment rule).

    Position t predicts byte t+1 and reads the latent of the patch *before* the one containing t+1:
    (number of patch starts <= t+1) - 2.
    """
    return bisect.bisect_right(starts, position + 1) - 2


class BLTModel(nn.Module):
    """A Byte Latent Transformer built from ``config``: hash embeddings, local encoder, global transformer,
    local decoder and the entropy model when the config has one. Built directly, its weights are torch's
    default initialisation; :func:`blt_decode.load_model` loads a checkpoint."""

    def __init__(self, config: BLTConfig):
        super().__init__()
        self.config = config
        self.patcher = Patcher.from_config(config)
        self.local_encoder = LocalEncoder(config.encoder, config)
        self.global_transformer = GlobalTransformer(config.global_, config.cross_attn_k * config.encoder.dim)
        self.local_decoder = LocalDecoder(config.decoder, config)
        self.encoder_hash_tok_embedding = nn.ModuleList(
            nn.Embedding(config.encoder_hash_byte_group_vocab, config.encoder.dim) for _ in range(config.n_hash_tables)
        )
        self.entropy_model = (
            EntropyModel(config.entropy_model, config.vocab_size) if config.entropy_model is not None else None
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.local_encoder.tok_embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.local_encoder.tok_embeddings.weight.device

    # -- pieces used by both paths -------------------------------------------------------------
    def embed(self, ids: torch.Tensor, n_last: int | None = None) -> torch.Tensor:
        """Byte + hash n-gram embeddings of the last ``n_last`` positions of ``ids`` ([B, T]).

        ``ids`` must reach back far enough for the longest n-gram (or to position 0, where the
        reference pads with zeros).
        """
        n_last = ids.shape[1] if n_last is None else n_last
        h = self.local_encoder.tok_embeddings(ids[:, -n_last:])
        tables = hash_table_ids(
            ids, self.config.encoder_hash_byte_group_size, self.config.encoder_hash_byte_group_nb_functions,
            self.config.encoder_hash_byte_group_vocab,
        )
        for table, bucket_ids in zip(self.encoder_hash_tok_embedding, tables):
            h = h + table(bucket_ids[:, -n_last:])
        return h

    def embed_at(self, ids: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Byte + hash n-gram embeddings [N, dim] of the bytes at ``positions`` ([N]) of the sequences in
        rows ``slots`` ([N]) of ``ids`` ([slots, capacity]); positions before 0 read as id 0, as the
        reference pads (the decode session's way: packed positions of many sequences at once)."""
        offsets = torch.arange(-self.hash_context, 1, device=positions.device)
        where = positions[:, None] + offsets  # [N, context + 1], oldest first
        windows = ids[slots[:, None], where.clamp_min(0)].masked_fill(where < 0, 0)
        h = self.local_encoder.tok_embeddings(windows[:, -1])
        tables = hash_table_ids_of_windows(
            windows, self.config.encoder_hash_byte_group_size, self.config.encoder_hash_byte_group_nb_functions,
            self.config.encoder_hash_byte_group_vocab,
        )
        for table, bucket_ids in zip(self.encoder_hash_tok_embedding, tables):
            h = h + table(bucket_ids)
        return h

    @property
    def hash_context(self) -> int:
        """How many earlier positions a new position's hash n-grams reach back."""
        return max(self.config.encoder_hash_byte_group_size, default=1) - 1

    def entropies(self, ids: torch.Tensor) -> torch.Tensor:
        """Entropy (nats) of the entropy model's next-byte prediction at every position of ``ids`` [B, T]."""
        assert self.entropy_model is not None
        return entropy_of_logits(self.entropy_model(ids))

    def summarize_patches(self, byte_states: torch.Tensor, spans: Sequence[tuple[int, int]]) -> torch.Tensor:
        """Patch vectors [len(spans), k*dim] for patches [s, e) of one sequence's byte states ([T, dim])."""
        longest = max(e - s for s, e in spans)
        index = torch.zeros(len(spans), longest, dtype=torch.long, device=byte_states.device)
        mask = torch.zeros(len(spans), longest, dtype=torch.bool, device=byte_states.device)
        for j, (s, e) in enumerate(spans):
            index[j, : e - s] = torch.arange(s, e)
            mask[j, : e - s] = True
        return self.local_encoder.summarize(byte_states[index], mask)

    # -- the full-sequence reference forward ---------------------------------------------------
    def patch_layout(self, ids: torch.Tensor) -> PatchLayout:
        b, t = ids.shape
        if self.patcher.uses_entropy:
            ent = self.entropies(ids)
            rows = ent.tolist()
            return PatchLayout(tuple(tuple(self.patcher.patch_starts(t, r)) for r in rows), ent)
        return PatchLayout(tuple(tuple(self.patcher.patch_starts(t)) for _ in range(b)), None)

    def forward(self, ids: torch.Tensor, layout: PatchLayout | None = None) -> torch.Tensor:
        """Next-byte logits [B, T, vocab] for every position of ``ids`` ([B, T], each row starting with BOS)."""
        b, t = ids.shape
        layout = layout or self.patch_layout(ids)
        byte_states = self.local_encoder(self.embed(ids))
        n_closed = max(len(s) - 1 for s in layout.starts)
        patch_vectors = byte_states.new_zeros(b, n_closed, self.config.cross_attn_k * self.config.encoder.dim)
        for row, starts in enumerate(layout.starts):
            spans = list(zip(starts[:-1], starts[1:]))
            if spans:
                patch_vectors[row, : len(spans)] = self.summarize_patches(byte_states[row], spans)
        latents = self.global_transformer(patch_vectors)
        index = torch.tensor([[latent_index(s, p) for p in range(t)] for s in layout.starts], device=ids.device)
        per_position = latents.gather(1, index[..., None].expand(-1, -1, latents.shape[-1]))
        return self.local_decoder(byte_states, per_position)

    # -- accounting ------------------------------------------------------------------------------
    def param_counts(self) -> ParamCounts:
        def count(module: nn.Module | None, skip: tuple[str, ...] = ()) -> int:
            if module is None:
                return 0
            return sum(p.numel() for name, p in module.named_parameters() if not name.startswith(skip))

        return ParamCounts(**{s.attr: count(self.stack(s), ("tok_embeddings",) if s in EMBEDDED else ())
                              for s in Stack})

    def stack(self, stack: Stack) -> nn.Module | None:
        """The module of ``stack`` (None: a model without an entropy model)."""
        return {Stack.PATCHER: self.entropy_model, Stack.ENCODER: self.local_encoder,
                Stack.GLOBAL: self.global_transformer, Stack.DECODER: self.local_decoder}[stack]


def init_weights(model: BLTModel, generator: torch.Generator) -> BLTModel:
    """Truncated-normal initialisation with std 1/sqrt(fan_in) and unit norms (the public code's scheme)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, (nn.Linear, nn.Embedding)):
                w = module.weight
                std = w.shape[-1] ** -0.5
                # drawn in at least float32, so that a bfloat16 model holds the float32 model's weights rounded
                drawn = torch.empty(w.shape, dtype=torch.promote_types(w.dtype, torch.float32), device=w.device)
                w.copy_(torch.nn.init.trunc_normal_(drawn, std=std, a=-3 * std, b=3 * std, generator=generator))
    return model


# -- block diffusion (BLT-D) -------------------------------------------------------------------------
# The block contract shared by training and inference: a block of B positions starting at a patch start
# s holds the ids of bytes s..s+B-1, some replaced by [MASK] (BOE_ID); the decoder reads it through the
# local encoder's byte embedding (no hash n-grams, no encoder layers), at rotary positions s..s+B-1; it
# sees clean positions < s (within the decoder's sliding window) and its own block, nothing else; it
# cross-attends to latent_index(starts, s - 1); the logits at s+i predict the byte AT s+i. The training
# forward over many blocks at once is blt_decode/training/diffusion.py.


def block_latent_index(starts: Sequence[int], block_start: int) -> int:
    """The latent a block starting at ``block_start`` reads: the one clean position s-1 reads."""
    return latent_index(starts, block_start - 1)


def block_rows_mask(block_start: int, block_size: int, kv_clean: int, window: int | None,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean [B, kv_clean + B] self-attention mask of one block whose keys are ``kv_clean`` clean
    positions followed by the block itself (the decode session's layout: clean KV cache, then the block).

    Block position p = block_start + i sees clean key j when j < block_start and p - j < window, and
    every position of its own block.
    """
    q = torch.arange(block_start, block_start + block_size, device=device)[:, None]
    k = torch.arange(kv_clean, device=device)[None, :]
    clean = (k < block_start).expand(block_size, -1)
    if window is not None:
        clean = clean & ((q - k) < window)
    return torch.cat([clean, torch.ones(block_size, block_size, dtype=torch.bool, device=device)], dim=1)
