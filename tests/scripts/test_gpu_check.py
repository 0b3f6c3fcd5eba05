"""``scripts/gpu-check.sh --dry-run``: the lent-GPU run (issue 35) keeps working between GPUs.

The dry run is the real script with tiny sizes on the CPU: every step of parts A and B is recorded in
``$OUT/results.json`` with a status, the CUDA-only ones skipped with the reason, the rest run for real
(tiny benches, a few training steps, the export cut into pieces), and ``summary.md`` says the same.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import blt_decode

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_check  # noqa: E402

#: every step a run records, in order (each compiled backend's three steps follow part A's)
PART_A = ["nvidia-smi", "install-greenlet", "install-package", "facts", "cuda-tests-eager", "roofline",
          "bench-default-eager", "build-blt1b", "bench-blt1b-eager", "hf-generate-blt1b", "train-bench"]
PART_B = ["corpus", "entropy-model", "train-pilot", "train", "export-model"]
STATUSES = {"ok", "failed", "timeout", "skipped"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-out")
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh"), "--dry-run"], env=env, capture_output=True,
                          text=True, timeout=600)
    return out, done


def test_dry_run_records_every_step_with_a_status(dry_run):
    out, done = dry_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    steps = {s["name"]: s for s in results["steps"]}
    backends = [b for b in blt_decode.backend_names() if b != "eager"]
    per_backend = [f"{kind}-{b}" for b in backends for kind in ("cuda-tests", "bench-default", "bench-blt1b")]
    expected = PART_A + per_backend + PART_B
    assert [s["name"] for s in results["steps"]] == expected
    assert all(s["status"] in STATUSES for s in results["steps"])
    # on the CPU the CUDA steps say why they did not run; the rest ran, at tiny sizes
    assert steps["cuda-tests-eager"]["status"] == "skipped" and "CUDA" in steps["cuda-tests-eager"]["reason"]
    assert steps["cuda-tests-eager"]["data"]["tests"] >= 1  # collected, then skipped: the file imports on the CPU
    for name in per_backend:
        assert steps[name]["status"] == "skipped" and steps[name]["reason"], name
    for name in ("facts", "roofline", "bench-default-eager", "build-blt1b", "bench-blt1b-eager", "train-bench",
                 "corpus", "entropy-model", "train", "export-model"):
        assert steps[name]["status"] == "ok", (name, steps[name]["reason"])
    assert results["facts"]["device_used"] == "cpu" and results["dry_run"] is True
    assert steps["roofline"]["data"]["matvec_gb_per_s"] > 0
    assert {r["batch_size"] for r in steps["bench-default-eager"]["data"]["throughput"]} == {1, 2}
    assert steps["train"]["data"]["steps"] >= 1


def test_dry_run_brings_back_few_small_files(dry_run):
    """The device tool returns at most 8 files of at most 16 MiB from $OUT, no deeper than 2 folders."""
    out, _ = dry_run
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(p.stat().st_size <= 16 << 20 for p in files), files
    names = {p.name for p in files}
    assert {"results.json", "summary.md", "steps.log", "artifacts.tar.gz", "model-config.json"} <= names
    with tarfile.open(out / "artifacts.tar.gz") as tar:
        packed = set(tar.getnames())
    assert "logs/train.log" in packed and "bench-default-eager.json" in packed and "train-log.jsonl" in packed


def test_the_exported_pieces_reassemble_to_a_loadable_model(dry_run, tmp_path):
    out, _ = dry_run
    results = json.loads((out / "results.json").read_text())
    export = next(s for s in results["steps"] if s["name"] == "export-model")["data"]
    whole = b"".join((out / name).read_bytes() for name in export["pieces"])
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.safetensors").write_bytes(whole)
    (model_dir / "config.json").write_bytes((out / "model-config.json").read_bytes())
    assert len(whole) == export["bytes"]
    model = blt_decode.load_model(str(model_dir))
    assert blt_decode.generate(model, "def f(x):", max_new_bytes=4).stats.new_bytes == 4


def test_summary_names_every_step(dry_run):
    out, _ = dry_run
    summary = (out / "summary.md").read_text()
    results = json.loads((out / "results.json").read_text())
    assert summary.startswith("# GPU check (dry run, CPU)")
    for step in results["steps"]:
        assert f"| {step['name']} | {step['part']} | {step['status']} |" in summary


def test_pieces_are_cut_below_the_tools_file_limit():
    assert gpu_check.PIECE_BYTES <= 16 << 20


def test_pilot_rate_leaves_out_the_first_steps(tmp_path):
    log = [{"step": i, "bytes_seen": 1000 * i, "wall_time_s": 10.0 + (0 if i == 1 else i)} for i in range(1, 10)]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    # steps 4..9: 5000 bytes in 5 s, whatever the start-up of step 1 cost
    assert gpu_check._pilot_rate(tmp_path) == pytest.approx(1000.0)
    assert gpu_check._pilot_rate(tmp_path / "missing") is None


def test_train_bench_on_cuda_without_a_gpu_is_one_error_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    done = subprocess.run([sys.executable, "-m", "blt_decode", "train-bench", "--presets", "tiny", "--device", "cuda"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "no CUDA device" in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_without_pip_the_package_runs_from_a_staged_copy(tmp_path):
    """The GPU machine's Python may lack setuptools, so ``pip install -e`` fails: the script then runs the
    checkout from a copy laid out as installed (strategies/ and backends/ inside blt_decode/). Here both
    are hidden behind PYTHONPATH: setuptools fails to import and so does the installed blt_decode."""
    hidden = tmp_path / "hidden"
    for name in ("setuptools", "blt_decode"):
        (hidden / name).mkdir(parents=True)
        (hidden / name / "__init__.py").write_text(f"raise ImportError('{name} hidden by the test')\n")
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "PYTHONPATH": str(hidden)}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh"), "--dry-run", "--part", "A", "--only",
                           "facts"], env=env, capture_output=True, text=True, timeout=300)
    results = json.loads((out / "results.json").read_text())
    steps = {s["name"]: s for s in results["steps"]}
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert steps["install-package"]["status"] == "ok" and "staged copy" in steps["install-package"]["reason"]
    assert results["facts"]["package_from"].startswith("staged copy on PYTHONPATH")
    assert steps["facts"]["status"] == "ok" and "autoregressive" in results["facts"]["strategies"]
