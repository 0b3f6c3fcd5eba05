"""The decode session: incremental BLT decoding with KV caches and rollback.

A session owns the decode state of one sequence: the ids so far, their entropies and patch starts, the
encoder's byte states, the latents of closed patches, the logits at every position, and one
:class:`~blt_decode.cache.KVCache` per module (entropy model, encoder, global model, decoder).

Strategies touch the model only through its primitives:

- :meth:`prefill` / :meth:`append` process new ids (one forward pass per module over the chunk) and
  return their next-byte logits. The global model runs only when the chunk closes patches.
- :meth:`truncate` rolls everything back to a shorter length (set lengths back; nothing is recomputed).
- :meth:`draft` runs encoder + decoder only on ids past the committed length, reusing the last available
  latent (BLT-S drafting). Drafts are scratch: the next append or truncate discards them.
- :meth:`verify` is :meth:`append` counted as a verification pass.
- :meth:`denoise` runs the decoder only over a (partly) masked block placed right after the committed
  sequence (BLT-D): the block sees the committed bytes and itself, reads the latent of the patch before
  its start, and its logits predict the byte AT each block position. Scratch, like drafts.
- :meth:`reference_logits` runs the full uncached forward (the public reference generator's way).

Every primitive counts its forward passes into :attr:`stats`; nobody else counts.
"""

from __future__ import annotations

from typing import Callable, Sequence

import attrs
import torch

from blt_decode.cache import KVCache
from blt_decode.model import BLTModel, ParamCounts, block_latent_index, block_rows_mask, latent_index
from blt_decode.patcher import entropy_of_logits
from blt_decode.stats import StatsRecorder
from blt_decode.trace import Drafted, GlobalPass, PatchClosed, Trace


@attrs.frozen
class StackRunners:
    """The callables a session runs the four transformer stacks with, each ``(x, start, cache) -> out``.

    The eager backend uses the model's modules themselves; the compiled backend swaps in compiled
    versions. The session's decoding logic (what runs when) is the same for every backend."""

    entropy: Callable[..., torch.Tensor] | None
    encoder: Callable[..., torch.Tensor]
    global_: Callable[..., torch.Tensor]
    decoder: Callable[..., torch.Tensor]

    @classmethod
    def eager(cls, model: BLTModel) -> "StackRunners":
        return cls(model.entropy_model, model.local_encoder, model.global_transformer, model.local_decoder)


class DecodeSession:
    def __init__(self, model: BLTModel, capacity: int, runners: StackRunners | None = None):
        cfg = model.config
        self.model = model
        self.run = runners or StackRunners.eager(model)
        self.capacity = capacity
        dtype, device = model.dtype, model.device
        self.ids = torch.zeros(capacity, dtype=torch.long, device=device)
        self.byte_states = torch.zeros(capacity, cfg.encoder.dim, dtype=dtype, device=device)
        self.latents = torch.zeros(capacity, cfg.global_.dim, dtype=dtype, device=device)
        self.logits = torch.zeros(capacity, cfg.vocab_size, dtype=dtype, device=device)
        self.entropies: list[float] = []
        self.starts: list[int] = []
        self.length = 0
        self._draft_length = 0
        self._param_counts: ParamCounts | None = None
        self.stats = StatsRecorder()
        self.trace: Trace | None = None  # attached by generate(..., trace=True)
        self.entropy_cache: KVCache | None = (
            model.entropy_model.new_cache(capacity, dtype=dtype, device=device) if model.entropy_model is not None else None
        )
        self.encoder_cache = model.local_encoder.new_cache(capacity, dtype=dtype, device=device)
        self.global_cache = model.global_transformer.new_cache(capacity, dtype=dtype, device=device)
        self.decoder_cache = model.local_decoder.new_cache(capacity, dtype=dtype, device=device)

    def emit(self, event: object) -> None:
        """Record a trace event (a no-op unless tracing is on)."""
        if self.trace is not None:
            self.trace.emit(event)

    # -- state ------------------------------------------------------------------------------------
    @property
    def closed_patches(self) -> int:
        return max(len(self.starts) - 1, 0)

    @property
    def next_logits(self) -> torch.Tensor:
        """Logits for the byte after the committed sequence."""
        if self.length == 0:
            raise RuntimeError("the session is empty: prefill it first")
        return self.logits[self.length - 1]

    @property
    def param_counts(self) -> ParamCounts:
        """Parameters read per forward pass of each module (what Eq. 8 weighs passes by): lets a strategy
        plan its passes' cost without touching the model."""
        if self._param_counts is None:
            self._param_counts = self.model.param_counts()
        return self._param_counts

    def token_ids(self) -> list[int]:
        return self.ids[: self.length].tolist()

    def _check_room(self, end: int) -> None:
        if end > self.capacity:
            raise RuntimeError(f"decode session capacity {self.capacity} exceeded (position {end})")

    # -- primitives -------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, ids: Sequence[int]) -> torch.Tensor:
        """Start the session with ``ids`` (BOS first); returns logits [len(ids), vocab]."""
        if self.length:
            self.truncate(0)
        return self.append(ids)

    @torch.no_grad()
    def append(self, ids: Sequence[int]) -> torch.Tensor:
        """Commit ``ids`` after the current sequence; returns their next-byte logits [len(ids), vocab]."""
        model, n, t = self.model, self.length, len(ids)
        if t == 0:
            raise ValueError("append needs at least one id")
        self._check_room(n + t)
        self._draft_length = 0
        self.ids[n : n + t] = torch.as_tensor(list(ids), dtype=torch.long)
        window = self.ids[None, : n + t]

        entropies = None
        if model.patcher.uses_entropy:
            entropies = entropy_of_logits(self.run.entropy(window[:, n:], n, self.entropy_cache))[0].tolist()
            self.stats.add(patcher=1)
        del self.entropies[n:]
        self.entropies.extend(entropies or [])
        if n == 0:
            self.starts = [0]
        closed_before = self.closed_patches
        model.patcher.extend_starts(self.starts, n, entropies, n + t)

        lo = max(0, n - model.hash_context)
        states = self.run.encoder(model.embed(window[:, lo:], n_last=t), n, self.encoder_cache)[0]
        self.stats.add(encoder=1)
        self.byte_states[n : n + t] = states

        closed = self.closed_patches
        if closed > closed_before:
            spans = list(zip(self.starts[closed_before:closed], self.starts[closed_before + 1 : closed + 1]))
            vectors = model.summarize_patches(self.byte_states, spans)
            self.latents[closed_before:closed] = self.run.global_(vectors[None], closed_before, self.global_cache)[0]
            self.stats.add(global_=1)
            if self.trace is not None:
                for s, e in spans:
                    by_entropy = entropies is not None and e >= 2 and self.entropies[e - 1] > model.patcher.threshold
                    self.emit(PatchClosed(s, e, self.entropies[e - 1] if by_entropy else None))
                self.emit(GlobalPass(closed_before, closed - closed_before))

        index = torch.tensor([latent_index(self.starts, p) for p in range(n, n + t)], device=self.latents.device)
        logits = self.run.decoder(states[None], self.latents[index][None], n, self.decoder_cache)[0]
        self.stats.add(decoder=1)
        self.logits[n : n + t] = logits
        self.length = n + t
        return logits

    @torch.no_grad()
    def verify(self, ids: Sequence[int]) -> torch.Tensor:
        """One full pass (patcher, encoder, global, decoder) over drafted ids, committing them; the
        caller truncates back to what it accepts. Returns logits [len(ids), vocab]."""
        self.stats.add(verify_passes=1)
        return self.append(ids)

    @torch.no_grad()
    def draft(self, ids: Sequence[int]) -> torch.Tensor:
        """Decoder-only logits for ids placed after the committed sequence and earlier drafts, reading
        the last available latent (no patcher, no global model). Returns logits [len(ids), vocab]."""
        model, t = self.model, len(ids)
        if self.closed_patches == 0:
            raise RuntimeError("draft needs at least one closed patch: prefill first")
        pos = self.length + self._draft_length
        self._check_room(pos + t)
        self.ids[pos : pos + t] = torch.as_tensor(list(ids), dtype=torch.long)
        lo = max(0, pos - model.hash_context)
        states = self.run.encoder(model.embed(self.ids[None, lo : pos + t], n_last=t), pos, self.encoder_cache)
        self.stats.add(encoder=1)
        latent = self.latents[self.closed_patches - 1].expand(1, t, -1)
        logits = self.run.decoder(states, latent, pos, self.decoder_cache)[0]
        self.stats.add(decoder=1)
        self.emit(Drafted(pos, tuple(int(i) for i in ids)))
        self._draft_length += t
        return logits

    @torch.no_grad()
    def denoise(self, block_ids: Sequence[int]) -> torch.Tensor:
        """Decoder-only logits [B, vocab] for a block of ids (:data:`~blt_decode.model.MASK_ID` where unknown) at positions
        length..length+B-1: logits row i predicts the byte AT position length+i (masked diffusion).

        The block enters through the encoder's byte embedding only, attends to the committed bytes
        (sliding window) and bidirectionally to itself, and cross-attends to the latent clean position
        length-1 reads. Its keys go to scratch cache slots past the committed length, which the next
        append overwrites. Counts one decoder pass."""
        model, b, n = self.model, len(block_ids), self.length
        if b == 0:
            raise ValueError("denoise needs at least one block position")
        if n == 0:
            raise RuntimeError("denoise needs a committed prefix: prefill first")
        self._check_room(n + b)
        index = block_latent_index(self.starts, n)
        if index < 0:
            raise RuntimeError("denoise needs at least one closed patch: prefill first")
        ids = torch.as_tensor(list(block_ids), dtype=torch.long, device=self.ids.device)
        x = model.local_encoder.tok_embeddings(ids)[None]
        latent = self.latents[index].expand(1, b, -1)
        mask = block_rows_mask(n, b, n, model.config.decoder.sliding_window, device=x.device)
        positions = torch.arange(n, n + b, device=x.device)
        logits = self.run.decoder(x, latent, n, self.decoder_cache, mask=mask, positions=positions)[0]
        self.decoder_cache.length = n  # the block's keys are scratch, never part of the committed state
        self._draft_length = 0
        self.stats.add(decoder=1, denoise_passes=1)
        return logits

    def truncate(self, length: int) -> None:
        """Roll the session back to its first ``length`` ids (drafts are discarded too)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a session of length {self.length} to {length}")
        self.length = length
        self._draft_length = 0
        del self.entropies[length:]
        self.starts = [s for s in self.starts if s <= length] if length else []
        for cache in (self.entropy_cache, self.encoder_cache, self.decoder_cache):
            if cache is not None:
                cache.truncate(length)
        self.global_cache.truncate(self.closed_patches)

    @torch.no_grad()
    def reference_logits(self, ids: Sequence[int]) -> torch.Tensor:
        """Logits [len(ids), vocab] from the full uncached forward over ``ids``; leaves the session's
        caches alone but records the patch layout so statistics stay meaningful."""
        model = self.model
        batch = torch.as_tensor([list(ids)], dtype=torch.long, device=model.device)
        layout = model.patch_layout(batch)
        logits = model(batch, layout)[0]
        self.stats.add(patcher=1 if model.patcher.uses_entropy else 0, encoder=1, global_=1, decoder=1)
        self.starts = list(layout.starts[0])
        return logits
