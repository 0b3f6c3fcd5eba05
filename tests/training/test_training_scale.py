"""Training at scale, at tiny scale: --data sources, the site-packages code corpus, --init from a
converted checkpoint, presets with BLT's proportions, gradient accumulation and activation
checkpointing, torchrun DDP/FSDP on gloo (real processes, loopback), the loss plot."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import attrs
import pytest
import torch

import blt_decode
from blt_decode.checkpoints import formats
from blt_decode.model.config import stack_config
from blt_decode.training import BLT_PRESETS, TrainConfig, global_share, train
from blt_decode.training.data import load_data

CLI = [sys.executable, "-m", "blt_decode"]
QUIET = dict(progress=False, log=lambda message: None)
# float32 (--no-bf16): the process-layout tests compare runs to float32 rounding, which bfloat16 autocast
# (the default on CPUs with native bfloat16) would swamp
TINY = ["--preset", "tiny", "--seq-len", "64", "--batch-size", "4", "--lr", "3e-3", "--warmup-steps", "2",
        "--eval-every", "1000", "--eval-bytes", "256", "--eval-bytes-final", "256", "--checkpoint-every", "1000",
        "--threads", "1", "--no-progress", "--no-bf16"]


def run(args, timeout=240, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, **kw)


def losses(run_dir: Path, key: str = "loss") -> list[float]:
    return [json.loads(line)[key] for line in (run_dir / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Real code no test wrote: the first 6 KB of this package's modules, plus one non-matching file."""
    root = tmp_path_factory.mktemp("data")
    for path in sorted(Path(blt_decode.__file__).parent.glob("*.py")):
        (root / path.name).write_bytes(path.read_bytes()[:6000])
    (root / "notes.txt").write_text("not python\n" * 50)
    return root


@pytest.fixture(scope="module")
def entropy_dir(data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ent")
    train(TrainConfig(kind="entropy", out_dir=str(out), preset="tiny", seq_len=64, batch_size=4, steps=20, lr=3e-3,
                      warmup_steps=2, eval_every=1000, eval_bytes=256, eval_bytes_final=256, threads=1,
                      data=(str(data_dir),)), **QUIET)
    return out / "final"


def blt_config(out: Path, data_dir: Path, entropy_dir: Path, **kw) -> TrainConfig:
    base = dict(kind="blt", out_dir=str(out), preset="tiny", seq_len=64, batch_size=4, steps=4, lr=3e-3,
                warmup_steps=2, eval_every=1000, eval_bytes=256, eval_bytes_final=256, checkpoint_every=1000,
                threads=1, data=(str(data_dir),), entropy_model=str(entropy_dir), block_sizes=(4, 8), bf16=False)
    return TrainConfig(**{**base, **kw})


# -- presets -------------------------------------------------------------------------------------------
def test_presets_keep_blt_proportions():
    # BLT-1B's shape: the global model holds ~88-90 % of the weights a decoding step reads
    assert global_share(BLT_PRESETS["blt-1b"]) == pytest.approx(0.879, abs=0.005)
    for name in ("blt-10m", "blt-40m", "blt-150m"):
        assert 0.87 <= global_share(BLT_PRESETS[name]) <= 0.93, name
    assert global_share(BLT_PRESETS["default"]) == pytest.approx(0.775, abs=0.005)  # the small recipe's shape (the model shipped before blt-10m)


def test_preset_file_and_errors(tmp_path, data_dir, entropy_dir):
    preset = tmp_path / "shape.json"
    preset.write_text(json.dumps(attrs.evolve(BLT_PRESETS["tiny"], max_seqlen=512).to_dict()))
    result = train(blt_config(tmp_path / "run", data_dir, entropy_dir, preset=str(preset), steps=1), **QUIET)
    assert blt_decode.load_model(Path(result.out_dir) / "final").config.global_ == BLT_PRESETS["tiny"].global_
    bad = tmp_path / "bad.json"
    bad.write_text('{"encoder": 1}')
    for args, message in (
        (["--preset", str(bad)], "--preset"),
        (["--preset", "huge"], "unknown BLT preset 'huge'"),
        (["--batch-size", "3", "--grad-accum", "2"], "must be a multiple of processes x --grad-accum"),
        (["--init", str(tmp_path)], "drop --preset"),
        (["--device", "cuda"], "cuda") if not torch.cuda.is_available() else (["--data", "nope/"], "nope"),
        (["--data", str(tmp_path / "missing")], "no such file or directory"),
    ):
        out = run(CLI + ["train", "blt", "--out", str(tmp_path / "x"), "--entropy-model", str(entropy_dir),
                         "--data", str(data_dir)] + TINY + args, timeout=120)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert out.stderr.count("blt-decode: error:") == 1 and message in out.stderr, (args, out.stderr)


# -- data ----------------------------------------------------------------------------------------------
def test_data_sources_files_directories_jsonl(tmp_path, data_dir):
    py = load_data([str(data_dir)], include=["*.py"], heldout_fraction=0.2)
    names = [d.name for d in py.train + py.heldout]
    assert names and all(n.endswith(".py") for n in names) and py.heldout and py.train
    assert len(load_data([str(data_dir)]).train + load_data([str(data_dir)]).heldout) == len(names) + 1
    # the split depends on names only: same on every call
    assert load_data([str(data_dir)], include=["*.py"], heldout_fraction=0.2) == py
    records = [{"text": f"document {i}: " + "x" * i, "meta": i} for i in range(30)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as fh:
        fh.write(json.dumps({"text": "héllo"}) + "\n")
    both = load_data([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl.gz")], heldout_fraction=0.1)
    texts = {d.data for d in both.train + both.heldout}
    assert b"document 3: xxx" in texts and "héllo".encode() in texts and len(texts) == 31
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(blt_decode.BLTDecodeError, match=r"bad.jsonl:2: expected an object with a string 'text'"):
        load_data([str(tmp_path / "bad.jsonl")])


def _fake_dist(site: Path, name: str, licence_lines: str, files: dict[str, str]) -> None:
    info = site / f"{name}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n{licence_lines}")
    for rel, text in files.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(text)
    (info / "RECORD").write_text("".join(f"{rel},,\n" for rel in files) + f"{info.name}/METADATA,,\n")


def test_code_corpus_licences_duplicates_and_heldout_by_distribution(tmp_path):
    from blt_decode.training.corpus_code import build_code_corpus

    site = tmp_path / "site"
    shared = "def shared():\n    return 'vendored copy'\n"
    _fake_dist(site, "alpha", "License-Expression: MIT\n", {"alpha/__init__.py": "A = 1\n", "alpha/util.py": shared})
    _fake_dist(site, "beta", "Classifier: License :: OSI Approved :: BSD License\n",
               {"beta/core.py": "def beta():\n    pass\n", "beta/copied.py": shared})
    _fake_dist(site, "gamma", "License: GPL-3.0\n", {"gamma/x.py": "print('copyleft')\n"})
    _fake_dist(site, "delta", "", {"delta/y.py": "print('unknown licence')\n"})
    _fake_dist(site, "eps", "License-Expression: Apache-2.0 OR GPL-2.0-only\n", {"eps/z.py": "Z = 'dual'\n"})
    result = build_code_corpus(tmp_path / "out", paths=[str(site)], heldout=["beta"], log=lambda m: None)
    manifest = json.loads((tmp_path / "out" / "corpus.json").read_text())
    assert {s["name"]: s["reason"] for s in manifest["skipped"]} == {
        "gamma": "not a permissive licence", "delta": "no licence in the metadata"}
    assert result.distributions == ("alpha", "beta", "eps") and result.duplicates == 1
    assert result.version.startswith("blt-code-v1+py") and "+alpha-1.0+beta-1.0+eps-1.0+" in result.version
    corpus = load_data([str(tmp_path / "out")])
    assert corpus.version == result.version
    assert sorted(d.name for d in corpus.train) == ["site-code:alpha/alpha/__init__.py", "site-code:alpha/alpha/util.py",
                                                   "site-code:eps/eps/z.py"]
    assert [d.name for d in corpus.heldout] == ["site-code:beta/beta/core.py"]  # the duplicate is gone


def test_code_corpus_from_installed_packages_trains(tmp_path):
    """A small real subset (CI); `blt-decode corpus build code` without filters builds the full corpus."""
    out = run(CLI + ["corpus", "build", "code", "--out", str(tmp_path / "code"), "--dist", "attrs", "pluggy", "tqdm",
                     "packaging", "iniconfig", "--max-bytes", "1500000"], timeout=120)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert "tqdm" in summary["skipped"]  # MPL-2.0 AND MIT: not permissive, listed
    assert summary["heldout_distributions"] and summary["train_bytes"] > 500_000
    manifest = json.loads((tmp_path / "code" / "corpus.json").read_text())
    assert all(s["file"].endswith(".jsonl.gz") for s in manifest["shards"])
    assert {d["split"] for d in manifest["distributions"]} == {"train", "heldout"}
    trained = run(CLI + ["train", "entropy", "--out", str(tmp_path / "run"), "--data", str(tmp_path / "code"),
                         "--steps", "2"] + TINY, timeout=120)
    assert trained.returncode == 0, trained.stderr
    summary = json.loads((tmp_path / "run" / "training.json").read_text())
    assert summary["corpus"] == manifest["version"] and set(summary["heldout_bpb"]) == {"site-code"}


# -- from a checkpoint -----------------------------------------------------------------------------------
def test_init_from_original_layout_keeps_patching_learns_and_decodes(tmp_path, data_dir):
    # a random model written in the original (released) layout: what facebook/blt-1b looks like
    config = attrs.evolve(BLT_PRESETS["tiny"], entropy_model=stack_config(32, 1, 2, 512))
    source = blt_decode.random_model(config, 0)
    formats.save_checkpoint(source, tmp_path / "released", "original")
    assert formats.detect_format(tmp_path / "released") == "original"
    out = run(CLI + ["train", "blt", "--init", str(tmp_path / "released"), "--out", str(tmp_path / "run"),
                     "--data", str(data_dir), "--include", "*.py", "--steps", "30", "--block-sizes", "4", "8"]
              + [a for a in TINY if a not in ("--preset", "tiny")], timeout=240)
    assert out.returncode == 0, out.stderr
    curve = losses(tmp_path / "run")
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 1.0, curve
    trained = blt_decode.load_model(tmp_path / "run" / "final")
    assert trained.config.patching_threshold == source.config.patching_threshold
    for name, tensor in source.entropy_model.state_dict().items():  # the entropy model is kept, frozen
        torch.testing.assert_close(trained.entropy_model.state_dict()[name], tensor, rtol=0, atol=0)
    for strategy in blt_decode.strategy_names():
        g = blt_decode.generate(trained, "def ", strategy=strategy, max_new_bytes=16)
        assert g.stats.new_bytes > 0 or g.stats.stop_reason == "eos", strategy


# -- execution options ---------------------------------------------------------------------------------
def test_grad_accum_checkpointing_and_synthetic_data(tmp_path, data_dir, entropy_dir):
    base = train(blt_config(tmp_path / "base", data_dir, entropy_dir), **QUIET)
    accum = train(blt_config(tmp_path / "accum", data_dir, entropy_dir, grad_accum=2), **QUIET)
    ckpt = train(blt_config(tmp_path / "ckpt", data_dir, entropy_dir, activation_checkpointing=True), **QUIET)
    reference = losses(tmp_path / "base")
    for run_dir in ("accum", "ckpt"):
        assert losses(tmp_path / run_dir) == pytest.approx(reference, rel=1e-5), run_dir
    assert accum.final_loss == pytest.approx(base.final_loss, rel=1e-5) and ckpt.bytes_seen == base.bytes_seen
    synthetic = train(blt_config(tmp_path / "synthetic", data_dir, entropy_dir, synthetic_data=True), **QUIET)
    assert synthetic.bytes_per_s > 0 and synthetic.bytes_seen == base.bytes_seen
    # the same batches, made in memory up front: the same losses, without the data pipeline
    assert losses(tmp_path / "synthetic") == reference
    # the plot of the runs' curves
    out = run(CLI + ["train", "plot", str(tmp_path / "base"), str(tmp_path / "accum"), "--png", str(tmp_path / "c.png")])
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_compiled_training_step_matches_eager(tmp_path, data_dir, entropy_dir):
    train(blt_config(tmp_path / "eager", data_dir, entropy_dir, steps=3), **QUIET)
    train(blt_config(tmp_path / "compiled", data_dir, entropy_dir, steps=3, compile=True), **QUIET)
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-4)


# -- torchrun ------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str]) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(_free_port()), "-m", "blt_decode"] + args, timeout=300)


def test_torchrun_ddp_and_fsdp_match_one_process_and_resume_across_layouts(tmp_path, data_dir, entropy_dir):
    common = ["--entropy-model", str(entropy_dir), "--data", str(data_dir), "--steps", "4", "--block-sizes", "4", "8"] + TINY
    single = run(CLI + ["train", "blt", "--out", str(tmp_path / "one")] + common)  # 1 process x batch 4
    assert single.returncode == 0, single.stderr
    ddp = torchrun(["train", "blt", "--out", str(tmp_path / "ddp")] + common)  # 2 processes x batch 2
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    reference = losses(tmp_path / "one")
    assert losses(tmp_path / "ddp") == pytest.approx(reference, rel=1e-5)
    assert losses(tmp_path / "ddp", "diffusion") == pytest.approx(losses(tmp_path / "one", "diffusion"), rel=1e-5)
    # FSDP, interrupted after 2 steps; rank 0's checkpoint resumes in one process (and 2 micro-batches)
    fsdp = torchrun(["train", "blt", "--out", str(tmp_path / "fsdp"), "--parallel", "fsdp", "--stop-after", "2"] + common)
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    resumed = run(CLI + ["train", "blt", "--out", str(tmp_path / "fsdp"), "--resume", "--grad-accum", "2"] + common)
    assert resumed.returncode == 0, resumed.stderr
    assert losses(tmp_path / "fsdp") == pytest.approx(reference, rel=1e-5)
    # ... and a one-process checkpoint resumes under torchrun (DDP)
    again = run(CLI + ["train", "blt", "--out", str(tmp_path / "back"), "--stop-after", "2"] + common)
    assert again.returncode == 0, again.stderr
    back = torchrun(["train", "blt", "--out", str(tmp_path / "back"), "--resume"] + common)
    assert back.returncode == 0, back.stderr[-3000:]
    assert losses(tmp_path / "back") == pytest.approx(reference, rel=1e-5)
    a = blt_decode.load_model(tmp_path / "one" / "final").state_dict()
    b = blt_decode.load_model(tmp_path / "back" / "final").state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


# -- one clear line for bad options, checkpoints and corpora ---------------------------------------------
def _broken_byte_lm(root: Path, how: str) -> Path:
    from blt_decode.model.blt import EntropyModel
    from blt_decode.model.tokenizer import VOCAB_SIZE
    from blt_decode.training import ENTROPY_PRESETS, save_byte_lm

    path = save_byte_lm(EntropyModel(ENTROPY_PRESETS["tiny"], VOCAB_SIZE), root / how)
    config = json.loads((path / "config.json").read_text())
    if how == "truncated-weights":
        data = (path / "model.safetensors").read_bytes()
        (path / "model.safetensors").write_bytes(data[: len(data) // 3])
    elif how == "shape-mismatch":
        config["config"]["dim"] = 64
    elif how == "extra-field":
        config["config"]["extra_field"] = 1
    elif how == "list-config":
        config = [1]
    elif how == "missing-field":
        del config["config"]["n_heads"]
    (path / "config.json").write_text(json.dumps(config))
    return path


def _broken_corpus(root: Path, how: str) -> Path:
    path = root / how
    path.mkdir()
    manifest = {"format": "blt-decode-corpus", "kind": "site-code", "version": "v",
                "shards": [{"file": "train-00000.jsonl.gz", "split": "train"}]}
    with gzip.open(path / "train-00000.jsonl.gz", "wt") as fh:
        fh.write(json.dumps({"name": "a.py", "text": "x = 1\n" * 200}) + "\n")
    if how == "truncated-manifest":
        (path / "corpus.json").write_text(json.dumps(manifest)[:40])
        return path
    if how == "unknown-split":
        manifest["shards"][0]["split"] = "validation"
    elif how == "manifest-list":
        manifest = [manifest]
    elif how == "truncated-shard":
        data = (path / "train-00000.jsonl.gz").read_bytes()
        (path / "train-00000.jsonl.gz").write_bytes(data[: len(data) // 2])
    if isinstance(manifest, dict):  # the recorded sha256 (of the truncated bytes: the gzip reader must notice)
        manifest["shards"][0]["sha256"] = hashlib.sha256((path / "train-00000.jsonl.gz").read_bytes()).hexdigest()
    (path / "corpus.json").write_text(json.dumps(manifest))
    return path


BAD_OPTIONS = [
    (["--seed", "-1"], "--seed must be an integer in 0..2**63-1"),
    (["--eval-every", "0"], "--eval-every must be an integer in 1..1000000000"),
    (["--checkpoint-every", "0"], "--checkpoint-every must be an integer in 1..1000000000"),
    (["--eval-bytes", "0"], "--eval-bytes must be an integer in 1..4294967296"),
    (["--eval-bytes-final", "-5"], "--eval-bytes-final must be an integer in 1..4294967296"),
    (["--warmup-steps", "-1"], "--warmup-steps must be an integer in 0..1000000000"),
    (["--prefetch", "-1"], "--prefetch must be an integer in 0..1024"),
    (["--target-patch-length", "1"], "--target-patch-length must be a finite number > 1"),
    (["--heldout-fraction", "1"], "--heldout-fraction must be a number in [0, 1)"),
    (["--heldout-fraction", "-0.1"], "--heldout-fraction must be a number in [0, 1)"),
    (["--lr", "nan"], "--lr must be a finite number > 0"),
    (["--lr", "inf"], "--lr must be a finite number > 0"),
    (["--lr", "0"], "--lr must be a finite number > 0"),
    (["--time-budget", "nan"], "--time-budget must be a finite number >= 0"),
    (["--block-sizes", "0", "4"], "--block-sizes must be one or more integers in 1..4096"),
    (["--threads", "-1"], "--threads must be an integer in 0.."),
    (["--threads", "100000"], "--threads must be an integer in 0.."),
    # upper bounds: a typo is one line, not minutes of work or an allocator error
    (["--batch-size", "100000"], "--batch-size must be an integer in 1..65536"),
    (["--seq-len", str(10**9)], "--seq-len must be an integer in 8..1048576"),
    (["--steps", str(10**12)], "--steps must be an integer in 1..1000000000"),
    # options that do not apply are refused, not ignored
    (["--block-sizes", "4", "8"], "--block-sizes applies only to `train blt` (the BLT-D objective); drop it for `train entropy`"),
    (["--target-patch-length", "3"], "--target-patch-length applies only to `train blt`"),
    (["--stop-after", "-1"], "--stop-after must be an integer in 1..1000000000 (or unset), got -1"),
    (["--stop-after", "0"], "--stop-after must be an integer in 1..1000000000 (or unset), got 0"),
]


@pytest.mark.parametrize("args,message", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_bad_train_options_are_one_line(args, message, tmp_path, capsys):
    from blt_decode.cli import main

    assert main(["train", "entropy", "--out", str(tmp_path / "run")] + TINY + args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("blt-decode: error:") and message in err, err
    assert not (tmp_path / "run").exists()


BROKEN = [
    ("entropy-model", "truncated-weights", "model.safetensors is corrupt or truncated"),
    ("entropy-model", "shape-mismatch", "has shape (32, 32), the config expects (64, 64)"),
    ("entropy-model", "extra-field", "unknown config field(s): extra_field"),
    ("entropy-model", "missing-field", "missing config field(s): n_heads"),
    ("entropy-model", "list-config", "must hold a JSON object, found list"),
    ("data", "truncated-manifest", "corpus.json is not a readable JSON manifest"),
    ("data", "manifest-list", "corpus.json must hold a JSON object"),
    ("data", "unknown-split", "has split 'validation'; a split is 'train' or 'heldout'"),
    ("data", "truncated-shard", "is not a readable gzip JSONL shard"),
]


@pytest.mark.parametrize("option,how,message", BROKEN, ids=[h for _, h, _ in BROKEN])
def test_broken_entropy_models_and_corpora_are_one_line(option, how, message, tmp_path, data_dir, capsys):
    from blt_decode.cli import main

    if option == "entropy-model":
        args = ["blt", "--entropy-model", str(_broken_byte_lm(tmp_path, how)), "--data", str(data_dir)]
    else:
        args = ["entropy", "--data", str(_broken_corpus(tmp_path, how))]
    assert main(["train"] + args + ["--out", str(tmp_path / "run"), "--steps", "2"] + TINY) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("blt-decode: error:") and message in err, err


def test_train_config_refuses_bools_and_out_of_range_values_the_cli_cannot_give(tmp_path):
    from blt_decode.training import TrainingError

    for field, value, message in (
        ("steps", True, "--steps must be an integer in 1..1000000000, got True"),
        ("eval_every", 2.0, "--eval-every must be an integer in 1..1000000000, got 2.0"),
        ("block_sizes", (True, 4), "--block-sizes must be one or more integers in 1..4096"),
        ("t_min", 0.0, "t_min must be a number in (0, 1)"),
        ("t_min", 1.0, "t_min must be a number in (0, 1)"),
        ("lr", True, "--lr must be a finite number > 0, got True"),
        ("grad_clip", float("nan"), "grad_clip must be a finite number > 0"),
        ("bf16", "yes", "--bf16 must be True or False (or unset)"),
    ):
        with pytest.raises(TrainingError) as info:
            TrainConfig(kind="entropy", out_dir=str(tmp_path), **{field: value})
        assert message in str(info.value) and "\n" not in str(info.value), (field, str(info.value))
    assert TrainConfig(kind="blt", out_dir=str(tmp_path), lr=1, block_sizes=[4, 8]).lr == 1.0


def test_built_corpus_shards_stay_inside_the_directory_and_match_their_sha256(tmp_path):
    from blt_decode.tools.corpus import CorpusError
    from blt_decode.training.corpus_code import build_code_corpus

    site = tmp_path / "site"
    _fake_dist(site, "alpha", "License-Expression: MIT\n", {"alpha/__init__.py": "A = 1\n" * 50})
    _fake_dist(site, "beta", "License-Expression: MIT\n", {"beta/__init__.py": "B = 2\n" * 50})
    root = tmp_path / "corpus"
    build_code_corpus(root, paths=[str(site)], heldout=["beta"], log=lambda m: None)
    assert load_data([str(root)]).train  # as built: readable
    outside = tmp_path / "outside.jsonl.gz"
    with gzip.open(outside, "wt") as fh:
        fh.write(json.dumps({"name": "secret", "text": "not part of the corpus"}) + "\n")
    digest = hashlib.sha256(outside.read_bytes()).hexdigest()
    manifest = json.loads((root / "corpus.json").read_text())
    for file in ("../outside.jsonl.gz", str(outside), "sub/../../outside.jsonl.gz"):
        bad = json.loads(json.dumps(manifest))
        bad["shards"][0].update(file=file, sha256=digest)
        (root / "corpus.json").write_text(json.dumps(bad))
        with pytest.raises(CorpusError, match="not a path inside the corpus directory"):
            load_data([str(root)])
    (root / "link.jsonl.gz").symlink_to(outside)
    bad = json.loads(json.dumps(manifest))
    bad["shards"][0].update(file="link.jsonl.gz", sha256=digest)
    (root / "corpus.json").write_text(json.dumps(bad))
    with pytest.raises(CorpusError, match="resolves outside the corpus directory"):
        load_data([str(root)])
    # a shard changed after the build (same gzip framing, other text) no longer matches its sha256
    (root / "corpus.json").write_text(json.dumps(manifest))
    shard = root / manifest["shards"][0]["file"]
    with gzip.open(shard, "wt") as fh:
        fh.write(json.dumps({"name": "alpha/alpha/__init__.py", "text": "tampered\n"}) + "\n")
    with pytest.raises(CorpusError, match="does not match the sha256 recorded"):
        load_data([str(root)])


def test_mean_patch_length_is_measured_on_the_built_code_corpus(tmp_path, entropy_dir):
    """The built corpus's documents are of kind "site-code"; the final summary measures the mean patch
    length on held-out code of that kind too (it looked for "code" only, so it was always None)."""
    from blt_decode.training.corpus_code import build_code_corpus

    site = tmp_path / "site"
    source = Path(blt_decode.__file__).parent
    _fake_dist(site, "alpha", "License-Expression: MIT\n", {"alpha/api.py": (source / "api.py").read_text()[:20000]})
    _fake_dist(site, "beta", "License-Expression: MIT\n", {"beta/cache.py": (source / "model" / "cache.py").read_text()[:6000]})
    build_code_corpus(tmp_path / "corpus", paths=[str(site)], heldout=["beta"], log=lambda m: None)
    result = train(blt_config(tmp_path / "run", tmp_path / "corpus", entropy_dir, steps=1), **QUIET)
    assert set(result.heldout_bpb) == {"site-code"}
    assert result.mean_patch_length_code is not None and result.mean_patch_length_code > 1
    summary = json.loads((tmp_path / "run" / "training.json").read_text())
    assert summary["mean_patch_length_code"] == result.mean_patch_length_code


def test_code_corpus_licence_expressions_free_text_vendored_trees_and_heldout_packages(tmp_path):
    from blt_decode.training.corpus_code import build_code_corpus

    site = tmp_path / "site"
    ok = "License-Expression: MIT\n"
    # licences: SPDX precedence and parentheses; free text must name only permissive licences
    _fake_dist(site, "spdx-and", "License-Expression: GPL-3.0-only AND (MIT OR Apache-2.0)\n", {"spdx_and.py": "A = 1\n"})
    _fake_dist(site, "spdx-or", "License-Expression: (GPL-3.0-only AND MIT) OR Apache-2.0\n", {"spdx_or.py": "B = 1\n"})
    _fake_dist(site, "spdx-bad", "License-Expression: MIT AND (BSD-3-Clause\n", {"spdx_bad.py": "C = 1\n"})
    _fake_dist(site, "text-unknown", "License: Copyright Foo Inc., all rights reserved\n"
               "Classifier: License :: OSI Approved :: MIT License\n", {"text_unknown.py": "D = 1\n"})
    _fake_dist(site, "text-mixed", "License: MIT or GPL, at your option\n", {"text_mixed.py": "E = 1\n"})
    _fake_dist(site, "text-ok", "License: Apache License, Version 2.0\n"
               "Classifier: License :: OSI Approved\nClassifier: License :: OSI Approved :: Apache Software License\n",
               {"text_ok.py": "F = 1\n"})
    # a held-out distribution, a tool vendoring (an older copy of) it, a distribution installing into its
    # package, and namespace-package neighbours
    _fake_dist(site, "pygments", ok, {"pygments/__init__.py": "VERSION = 2\n", "pygments/lexer.py": "class Lexer: pass\n"})
    _fake_dist(site, "tool", ok, {"tool/__init__.py": "T = 1\n", "tool/_vendor/pygments/lexer.py": "class Lexer: 1\n",
                                  "tool/_vendor/pygments/__init__.py": "VERSION = 1\n",
                                  "tool/sub/thirdparty_files/attr/x.py": "X = 1\n"})
    _fake_dist(site, "pygments-plugin", ok, {"pygments/lexers_extra.py": "class Extra: pass\n"})
    _fake_dist(site, "ns-alpha", ok, {"ns/alpha/__init__.py": "ALPHA = 1\n"})
    _fake_dist(site, "ns-beta", ok, {"ns/beta/__init__.py": "BETA = 1\n", "ns/alpha/leak.py": "LEAK = 1\n"})
    result = build_code_corpus(tmp_path / "out", paths=[str(site)], heldout=["pygments", "ns-alpha"], log=lambda m: None)
    manifest = json.loads((tmp_path / "out" / "corpus.json").read_text())
    reasons = {s["name"]: s["reason"] for s in manifest["skipped"]}
    assert reasons == {
        "spdx-and": "not a permissive licence",
        "spdx-bad": reasons["spdx-bad"],
        "text-unknown": "unrecognised License text (names no known licence)",
        "text-mixed": "not a permissive licence",
        "pygments-plugin": "all its files belong to held-out distributions' packages",
    }, reasons
    assert reasons["spdx-bad"].startswith("not a valid SPDX expression")
    assert set(result.distributions) == {"spdx-or", "text-ok", "pygments", "tool", "ns-alpha", "ns-beta"}
    assert {(f["distribution"], f["path"], f["files"]) for f in manifest["skipped_files"]} == {
        ("tool", "tool/_vendor", 2), ("tool", "tool/sub/thirdparty_files", 1),
        ("pygments-plugin", "pygments", 1), ("ns-beta", "ns/alpha", 1)}
    corpus = load_data([str(tmp_path / "out")])
    trained = {d.name.split("/", 1)[1] for d in corpus.train}
    assert trained == {"spdx_or.py", "text_ok.py", "tool/__init__.py", "ns/beta/__init__.py"}, trained
    assert {d.name.split("/", 1)[1] for d in corpus.heldout} == {
        "pygments/__init__.py", "pygments/lexer.py", "ns/alpha/__init__.py"}


# -- train-bench ---------------------------------------------------------------------------------------
def test_train_bench_measures_presets_and_precisions_side_by_side(tmp_path, data_dir):
    out = run(CLI + ["train-bench", "--presets", "tiny", "--precisions", "float32,bfloat16", "--batch-size", "2",
                     "--seq-len", "32", "--steps", "2", "--warmup", "1", "--block-sizes", "4", "--data", str(data_dir),
                     "--json", str(tmp_path / "tb.json")], timeout=400)
    assert out.returncode == 0, out.stderr
    assert "| tiny | float32 | 2 x 32 |" in out.stdout and "| tiny | bfloat16 | 2 x 32 |" in out.stdout
    result = json.loads((tmp_path / "tb.json").read_text())
    assert result["gemm_bf16_gflops"] > 0 and result["gemm_f32_gflops"] > 0
    with torch.device("meta"):
        counts = blt_decode.BLTModel(BLT_PRESETS["tiny"]).param_counts()
    positions = 2 * 32  # batch x seq: encoder and decoder run over every byte, the decoder also over blocks
    least = 6 * (counts.encoder + counts.decoder) * positions
    most = 6 * (counts.encoder + counts.global_ + counts.decoder * (1 + 4)) * positions
    for row in result["rows"]:
        assert row["bytes_per_s"] > 0 and 0 < row["mfu"] < 1 and row["peak_rss_mb"] > 50
        assert least < row["model_tflop_per_step"] * 1e12 < most
    for args, message in ((["--presets", "huge"], "unknown BLT preset 'huge'"),
                          (["--precisions", "float16"], "precisions are float32, bfloat16")):
        bad = run(CLI + ["train-bench"] + args)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


# -- a trainer state with fields of the wrong type (issue 33) ------------------------------------------------
@pytest.fixture(scope="module")
def stopped_run(data_dir, tmp_path_factory) -> tuple[Path, list[str]]:
    """A run stopped after its first step (a complete checkpoint), and the flags that resume it."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    flags = ["train", "entropy", "--out", str(out), "--data", str(data_dir), "--steps", "3", *TINY]
    first = run([*CLI, *flags, "--stop-after", "1", "--checkpoint-every", "1"])
    assert first.returncode == 0, first.stderr[-3000:]
    return out, flags + ["--checkpoint-every", "1", "--resume"]


def _state_with(out: Path, tmp_path: Path, change) -> Path:
    """A copy of the run whose trainer_state.json is changed by ``change(state)``."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    path = copy / "checkpoint" / "trainer_state.json"
    state = json.loads(path.read_text())
    change(state)
    path.write_text(json.dumps(state))
    return copy


def test_resuming_a_state_whose_step_is_not_an_integer_is_one_line(stopped_run, tmp_path):
    """`"step": "two"` was a ValueError traceback after the model and the corpus had loaded."""
    out, flags = stopped_run
    copy = _state_with(out, tmp_path, lambda s: s.update(step="two"))
    resumed = run([*CLI, *[str(copy) if f == str(out) else f for f in flags]])
    err = resumed.stderr.strip()
    assert resumed.returncode == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "trainer_state.json: 'step' must be an integer in 0..1000000000, got 'two'" in err, err


@pytest.mark.parametrize("change,words", [
    (lambda s: s.update(step=-1), "'step' must be an integer in 0..1000000000, got -1"),
    (lambda s: s.update(step=True), "'step' must be an integer"),
    (lambda s: s.update(config=["lr"]), "'config' must be an object"),
    (lambda s: s.update(corpus=7), "'corpus' must be a string or null"),
    (lambda s: s.pop("extra"), "has no 'extra' field"),
    (lambda s: s["extra"].update(bytes_seen="many"), "'extra'.bytes_seen must be an integer >= 0"),
    (lambda s: s["extra"].update(wall_time_s=float("inf")), "'extra'.wall_time_s must be a finite number >= 0"),
    (lambda s: s["param_groups"][0].update(lr="fast"), "'param_groups'[0].lr must be a number"),
    (lambda s: s["param_groups"][0].update(params=[1, 2]), "'param_groups'[0].params must be a list of parameter names"),
    (lambda s: s.update(scalar_state={"x": {"step": "one"}}), "'scalar_state'.x.step must be a number"),
    (lambda s: s.update(scalar_state={"nope": {"step": 1}}), "'scalar_state' names 'nope', no parameter"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_every_field_of_the_trainer_state_is_checked_by_type(stopped_run, tmp_path, change, words):
    from blt_decode.training import TrainConfig, TrainingError

    out, _ = stopped_run
    copy = _state_with(out, tmp_path, change)
    saved = json.loads((out / "checkpoint" / "trainer_state.json").read_text())["config"]
    config = TrainConfig(**{**saved, "out_dir": str(copy)})
    with pytest.raises(TrainingError, match=re.escape(words)) as info:
        train(config, resume=True, **QUIET)
    assert "\n" not in str(info.value)


def test_hostile_json_in_training_files_is_one_line(tmp_path):
    """Neighbours of the job reader: a --data JSONL line nested 100 000 deep, a log.jsonl line likewise
    (train plot), and a --preset file that never ends were a RecursionError or unbounded reads."""
    from blt_decode.errors import CorpusError
    from blt_decode.model.presets import blt_preset
    from blt_decode.training import TrainingError
    from blt_decode.training.plot import read_log

    deep = "[" * 100_000
    (tmp_path / "docs.jsonl").write_text('{"text": "fine"}\n' + deep + "\n")
    with pytest.raises(CorpusError, match=r"docs.jsonl:2: not valid JSON \(nested too deeply\)"):
        load_data([str(tmp_path / "docs.jsonl")])
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "\xff"}\n')
    with pytest.raises(CorpusError, match=r"bad.jsonl:2: not UTF-8 text"):
        load_data([str(tmp_path / "bad.jsonl")])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "log.jsonl").write_text('{"step": 1, "loss": 2.0}\n' + deep + "\n")
    with pytest.raises(TrainingError, match=r"log.jsonl:2 is not valid JSON \(nested too deeply\)"):
        read_log(tmp_path / "run")
    preset = tmp_path / "preset.json"
    with preset.open("wb") as fh:
        fh.truncate((16 << 20) + 1)  # sparse; /dev/zero alike
    with pytest.raises(TrainingError, match="larger than 16 MiB"):
        blt_preset(str(preset))
    preset.write_text(deep)
    with pytest.raises(TrainingError, match="nested too deeply"):
        blt_preset(str(preset))


def test_resuming_trims_the_log_within_bounds_and_refuses_a_log_that_is_not_a_file(stopped_run, tmp_path):
    """OUT/log.jsonl is the other output a resumed run reads back: a device there (/dev/zero) was read
    without end; a line that is not a record (nested 100 000 deep, or longer than 1 MiB) is dropped as torn."""
    import shutil

    from blt_decode.training import TrainingError
    from blt_decode.training.loop import _trim_log

    out, _ = stopped_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    log = copy / "log.jsonl"
    first = log.read_text().splitlines()[0]
    log.write_text(first + "\n" + "[" * 100_000 + "\n" + "x" * ((1 << 20) + 5) + "\n" + '{"step": 99, "loss": 1.0}\n')
    _trim_log(log, 1)
    assert log.read_text() == first + "\n"
    log.unlink()
    log.symlink_to("/dev/zero")
    with pytest.raises(TrainingError, match="a character device, not a regular file"):
        _trim_log(log, 1)
