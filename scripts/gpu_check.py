"""The driver of ``scripts/gpu-check.sh`` (issue 35): every step of a lent-GPU run, time-boxed, recorded.

Each step is a subprocess under coreutils ``timeout`` (its whole process group is killed at the limit)
with its output in a log of its own; a failed or timed-out step is recorded and the run goes on. A
part has a wall-clock budget (A 270 s, B 420 s): a step gets at most what is left of it. After every
step ``results.json`` and ``summary.md`` are rewritten and the logs and step outputs re-packed into
``artifacts.tar.gz``, so a run cut off by the device tool's limit still returns what it did. At most
8 files come back from the device machine, so $OUT holds only those, part B's model pieces and
``steps.log``.

The steps' own Python (facts, roofline, model building, transformers' generate, export) runs as
``python scripts/gpu_check.py --task NAME ...`` subprocesses of this file, so they are time-boxed too.
The top level imports only the standard library: it runs before greenlet and the package are installed.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CARRY = ROOT / "gpu-carry"
#: wall-clock budget of each part. The issue allows A 5 minutes and B 8, but the lease is 15 minutes in all,
#: the machine's start (1-2 min) included: 270 + 420 s and the calls' margins leave room for that start
PART_SECONDS = {"A": 270.0, "B": 420.0}
#: pieces of a file brought back from $OUT (the device tool returns files of at most 16 MiB)
PIECE_BYTES = 15 << 20
#: the default model's shape (docs/training.md, "The shipped default model")
SHIPPED_PRESET = "blt-10m"
NO_CUDA = "no CUDA GPU visible to torch here"
#: tests/execution/test_cuda.py's tests of a compiled backend, parametrised by its name (part A runs them per backend)
COMPILED_TESTS = ("test_compiled_backend_equals_eager_on_cuda_alone", "test_compiled_backend_batched_equals_eager_on_cuda",
                  "test_compiled_backend_cuda_graphs_replay_without_capture_or_sync")


# -- the run ---------------------------------------------------------------------------------------------
class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dry = args.dry_run
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        (self.work / "logs").mkdir()
        self.python = sys.executable
        self.env = dict(os.environ)
        self.cuda = False
        self.require_gpu = False  # set once the facts are in
        self.device = "cpu"
        self.part = "-"
        self.deadline = float("inf")
        self.only = [p for p in (args.only or "").split(",") if p]
        self.results: dict[str, Any] = {
            "dry_run": self.dry, "parts": args.part, "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "checkout": _git_head(), "facts": {}, "steps": []}
        (self.out / "steps.log").write_text("")

    # every step goes through here
    def step(self, name: str, cmd: list[str] | None, cap_s: float, *, skip: str | None = None,
             needs_cuda: bool = False, data: Path | None = None, env: dict[str, str] | None = None,
             min_s: float = 5.0, always: bool = False, after: Any = None) -> dict[str, Any]:
        record: dict[str, Any] = {"name": name, "part": self.part, "status": "skipped", "reason": None,
                                  "seconds": 0.0, "timeout_s": None, "returncode": None,
                                  "log": f"logs/{name}.log", "data": None}
        left = self.deadline - time.monotonic()
        if self.only and not always and not any(fnmatch.fnmatch(name, p) for p in self.only):
            record["reason"] = f"not selected by --only {','.join(self.only)}"
        elif skip is not None:
            record["reason"] = skip
        elif (needs_cuda or (self.require_gpu and not self.dry)) and not self.cuda:
            # outside a dry run every step after the facts is sized for the GPU: none runs on a CPU
            record["reason"] = NO_CUDA + (" (a dry run uses the CPU)" if self.dry else "")
        elif left < min_s:
            record["reason"] = f"part {self.part}'s {PART_SECONDS[self.part]:.0f} s budget is spent ({left:.0f} s left)"
        elif cmd is not None:
            limit = int(max(1, min(cap_s, left)))
            record["timeout_s"] = limit
            log = self.work / "logs" / f"{name}.log"
            start = time.monotonic()
            with log.open("w") as fh:
                fh.write(f"$ {' '.join(cmd)}\n")
                fh.flush()
                # timeout puts the command in a process group of its own and signals all of it at the
                # limit (inductor's compile workers too); --kill-after for what ignores SIGTERM
                proc = subprocess.run(["timeout", "--kill-after=10", str(limit), *cmd], stdout=fh,
                                      stderr=subprocess.STDOUT, cwd=self.work, env={**self.env, **(env or {})})
            record["seconds"] = round(time.monotonic() - start, 2)
            record["returncode"] = proc.returncode
            if proc.returncode in (124, 137):
                record["status"], record["reason"] = "timeout", f"stopped at its {limit} s limit"
            elif proc.returncode:
                record["status"] = "failed"
                record["reason"] = _last_line(log) or f"exit status {proc.returncode}"
            else:
                record["status"] = "ok"
            if data is not None and data.is_file():
                try:
                    record["data"] = json.loads(data.read_text())
                except ValueError:
                    record["data"] = None
            if after is not None:  # e.g. junit counts, which can turn "ok" into "skipped"
                after(record)
            with (self.out / "steps.log").open("a") as fh:
                fh.write(f"\n===== {name}: {record['status']} in {record['seconds']} s =====\n")
                fh.write(log.read_text(errors="replace")[-20000:])
        print(f"gpu-check: {name}: {record['status']}" + (f" ({record['reason']})" if record["reason"] else "")
              + (f" in {record['seconds']} s" if record["seconds"] else ""), flush=True)
        self.results["steps"].append(record)
        self.save()
        return record

    def task(self, name: str, *args: str) -> list[str]:
        """The command line of one of this file's own tasks."""
        return [self.python, str(Path(__file__).resolve()), "--task", name, *args]

    def cli(self, *args: str) -> list[str]:
        return [self.python, "-m", "blt_decode", *args]

    def save(self) -> None:
        self.results["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        _atomic_write(self.out / "results.json", json.dumps(self.results, indent=1, default=str) + "\n")
        _atomic_write(self.out / "summary.md", summary_markdown(self.results))
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            # the steps' outputs and logs only: models, corpora and checkpoints stay on the machine
            for path in sorted([*self.work.glob("*.json"), *self.work.glob("*.jsonl"), *self.work.glob("*.xml"),
                                *self.work.glob("logs/*.log")]):
                tar.add(path, arcname=str(path.relative_to(self.work)))
        _atomic_write(self.out / "artifacts.tar.gz", buffer.getvalue())


def _atomic_write(path: Path, content: str | bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(content.encode() if isinstance(content, str) else content)
    tmp.replace(path)


def _last_line(log: Path) -> str | None:
    """The line that says what failed: the last error line (pip and pytest end with hints and summaries),
    else the last line."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines()[1:] if line.strip()]
    errors = [line for line in lines if "error" in line.lower() or line.startswith(("E ", "FAILED"))]
    return (errors or lines or [None])[-1][:400] if lines else None


def _git_head() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None  # the device machine's copy may carry no .git


# -- the shared first steps: facts and installs ------------------------------------------------------------
def setup_steps(run: Run) -> None:
    facts_json = run.work / "facts.json"
    run.step("nvidia-smi", ["nvidia-smi"], 20,
             skip="dry run" if run.dry else (None if shutil.which("nvidia-smi") else "nvidia-smi is not on the PATH"))
    # the installs and the facts run whatever --only says: every other step needs them
    run.step("install-greenlet", _greenlet_install(run), 60, skip=_greenlet_skip(run), always=True)
    run.step("install-package", [run.python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                                 "--no-index", "-e", str(ROOT)], 120, skip=_package_skip(run), always=True)
    if not _package_importable(run):
        # pip could not install it (no setuptools, say): a copy with the package-dir mapping of
        # pyproject.toml, on PYTHONPATH (in a dry run too, so that CI exercises it)
        stage = run.work / "stage"
        shutil.copytree(ROOT / "blt_decode", stage / "blt_decode")
        shutil.copytree(ROOT / "strategies", stage / "blt_decode" / "strategies")
        shutil.copytree(ROOT / "backends", stage / "blt_decode" / "backends")
        run.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(stage), run.env.get("PYTHONPATH")]))
        run.results["facts"]["package_from"] = f"staged copy on PYTHONPATH ({stage})"
        record = run.results["steps"][-1]
        if record["status"] == "failed" and _package_importable(run, anywhere=True):
            # what the step was for is done: say how, and do not count it as a failure
            record["status"] = "ok"
            record["reason"] = f"pip install -e failed ({record['reason']}); a staged copy on PYTHONPATH instead"
            run.save()
    run.step("facts", run.task("facts", "--json", str(facts_json)), 60, data=facts_json, always=True)
    facts = run.results["steps"][-1]["data"] or {}
    run.results["facts"].update(facts)
    run.cuda = bool(facts.get("cuda_available")) and not run.dry
    run.device = "cuda" if run.cuda else "cpu"
    run.results["facts"]["device_used"] = run.device
    run.require_gpu = True


def _greenlet_skip(run: Run) -> str | None:
    if _importable(run, "greenlet"):
        return "greenlet is already importable"
    # without a carried wheel the step runs and fails, saying why
    return "dry run: installs nothing" if run.dry else None


def _greenlet_install(run: Run) -> list[str]:
    # the wheel for this interpreter (the GPU machine's is CPython 3.12)
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    wheels = sorted((CARRY / "wheels").glob(f"greenlet-*-{tag}-*.whl"))
    if not wheels:
        return ["sh", "-c", f"echo 'no {tag} greenlet wheel in {CARRY}/wheels (python3 scripts/gpu_check.py --prepare-carry "
                            f"here, then carry gpu-carry/wheels: docs/benchmarks.md, GPU run)'; exit 1"]
    return [run.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-cache-dir", str(wheels[-1])]


def _package_skip(run: Run) -> str | None:
    if run.dry:
        return "dry run: uses the package installed here" if _package_importable(run) else None
    if _package_importable(run):
        return "blt_decode with its strategies and backends already imports from this checkout"
    return None


def _importable(run: Run, module: str) -> bool:
    return subprocess.run([run.python, "-c", f"import {module}"], cwd=run.work, env=run.env,
                          capture_output=True).returncode == 0


def _package_importable(run: Run, anywhere: bool = False) -> bool:
    probe = ("import blt_decode, blt_decode.strategies, blt_decode.backends, pathlib, sys; "
             "print(pathlib.Path(blt_decode.__file__).resolve())")
    done = subprocess.run([run.python, "-c", probe], cwd=run.work, env=run.env, capture_output=True, text=True)
    if done.returncode:
        return False
    # the dry run takes whatever is installed; on the device machine it must be this checkout's code
    return run.dry or anywhere or Path(done.stdout.strip()).is_relative_to(ROOT)


# -- part A ---------------------------------------------------------------------------------------------
def part_a(run: Run) -> None:
    dry, work = run.dry, run.work
    # the registered backends other than eager, read at run time by the facts step (`blt-decode backends`)
    backends = [b for b in run.results["facts"].get("backends") or [] if b != "eager"]
    run.results["facts"]["compiled_backends"] = backends
    # 1. the CUDA tests that need no compiled backend, then (later) the compiled ones
    junit = work / "junit-eager.xml"
    # xunit1: the junit flavour that keeps the tests' record_property values (tie flips, captures, replays)
    pytest = [run.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT), "-o",
              "junit_logging=all", "-o", "junit_family=xunit1", "-rA"]
    cuda_tests = str(ROOT / "tests" / "execution" / "test_cuda.py")
    run.step("cuda-tests-eager", pytest + [cuda_tests, "-k", "not compiled", f"--junitxml={junit}"], 90,
             after=lambda record, junit=junit: _junit_status(record, junit))
    # 2. the HBM roofline: a matrix-vector product over a matrix far larger than the L2
    roof = work / "roofline.json"
    run.step("roofline", run.task("roofline", "--device", run.device, "--mib", "64" if dry else "4096",
                                  "--json", str(roof)), 60, data=roof)
    # 3. decoding benches, one process per (model, backend): a backend that hangs in warm-up costs only
    #    its own step. The default model in float32 (how it is shipped to be run) and a BLT-1B shape in bf16.
    blt1b = work / "blt1b"
    bench = _bench_args(run)
    bench_1b = _bench_args(run, new_bytes=16)  # 2.9 GB of weights a step: fewer bytes fit the part's minutes
    run.step("bench-default-eager", run.cli("bench", "--model", "random:tiny" if dry else "default",
                                           *bench, "--backends", "eager", "--json", str(work / "bench-default-eager.json")),
             75, data=work / "bench-default-eager.json")
    record = run.step("build-blt1b", run.task("build-model", "--preset", "tiny" if dry else "blt-1b",
                                              "--hash-vocab", "4099", "--dtype", "bfloat16", "--out", str(blt1b),
                                              "--json", str(work / "blt1b.json")), 90, data=work / "blt1b.json")
    have_blt1b = None if record["status"] == "ok" else "no BLT-1B-shaped model: build-blt1b did not finish"
    run.step("bench-blt1b-eager", run.cli("bench", "--model", str(blt1b), "--dtype", "bfloat16", *bench_1b,
                                         "--backends", "eager", "--json", str(work / "bench-blt1b-eager.json")),
             75, skip=have_blt1b, data=work / "bench-blt1b-eager.json")
    hf = work / "hf-generate.json"
    run.step("hf-generate-blt1b", run.task("hf-generate", "--model", str(blt1b), "--device", run.device,
                                           "--prompts", "2" if dry else "4", "--new-bytes", "8" if dry else "32",
                                           "--json", str(hf)), 90, skip=have_blt1b, data=hf)
    # 4. training throughput of the default model's shape in bfloat16
    tb = work / "train-bench.json"
    tb_args = (["--presets", "tiny", "--precisions", "float32", "--batch-size", "2", "--seq-len", "32", "--steps", "1",
                "--warmup", "1", "--block-sizes", "4", "--data", str(ROOT / "scripts")] if dry else
               ["--presets", SHIPPED_PRESET, "--precisions", "bfloat16", "--batch-size", "32", "--seq-len", "512",
                "--steps", "6", "--warmup", "3", "--block-sizes", "4", "8", "--data", "stdlib", "--threads", "8"])
    run.step("train-bench", run.cli("train-bench", *tb_args, "--device", run.device, "--json", str(tb)), 75,
             data=tb, skip=None if dry or run.cuda else NO_CUDA)
    # 5. what needs the compiled backends: their CUDA tests, then their benches (warm-up seconds included)
    not_compiled = "dry run: the compiled backends are not compiled on the CPU (minutes); the GPU run does" if dry else None
    for backend in backends:
        # one process per backend: its warm-up (and inductor's) is its own, and a backend that does not
        # finish in its limit leaves the others' results whole
        junit = work / f"junit-{backend}.xml"
        nodes = [f"{cuda_tests}::{test}[{backend}]" for test in COMPILED_TESTS]
        run.step(f"cuda-tests-{backend}", pytest + nodes + [f"--junitxml={junit}"],
                 120, skip=not_compiled, after=lambda record, junit=junit: _junit_status(record, junit))
        for model, extra, missing in (("default", bench, None), (str(blt1b), ["--dtype", "bfloat16", *bench_1b], have_blt1b)):
            label = "default" if model == "default" else "blt1b"
            path = work / f"bench-{label}-{backend}.json"
            run.step(f"bench-{label}-{backend}", run.cli("bench", "--model", model, *extra, "--backends", backend,
                                                        "--json", str(path)), 120, skip=not_compiled or missing, data=path)


def _bench_args(run: Run, new_bytes: int = 32) -> list[str]:
    if run.dry:
        return ["--device", "cpu", "--strategies", "ar,blt-s:k=8", "--prompt-set", "heldout-code", "--prompts", "2",
                "--max-new-bytes", "8", "--repeats", "1", "--batch-sizes", "1,2", "--full"]
    return ["--device", "cuda", "--strategies", "ar,blt-s:k=8", "--prompt-set", "heldout-code", "--prompts", "64",
            "--max-new-bytes", str(new_bytes), "--repeats", "1", "--batch-sizes", "1,16,64", "--full"]


def _junit_status(record: dict[str, Any], junit: Path) -> None:
    """Counts from pytest's junit XML; a run whose every test skipped is 'skipped', with the skip reason."""
    if not junit.is_file():
        return
    import xml.etree.ElementTree as ET

    root = ET.parse(junit).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    cases = []
    for case in suite.iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = f"{tag}: {(node.get('message') or '')[:300]}"
                break
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        cases.append({"test": case.get("name"), "outcome": outcome, "seconds": float(case.get("time", 0)), **props})
    record["data"] = {**counts, "cases": cases}
    if record["status"] == "ok" and counts["tests"] and counts["skipped"] == counts["tests"]:
        reasons = sorted({c["outcome"].removeprefix("skipped: ") for c in cases})
        record["status"], record["reason"] = "skipped", "; ".join(reasons)
    elif record["status"] == "failed" and counts["tests"] == 0 and counts["errors"] == 0:
        record["status"], record["reason"] = "skipped", "no test selected"


# -- part B ---------------------------------------------------------------------------------------------
def part_b(run: Run) -> None:
    dry, work = run.dry, run.work
    data = _corpus_step(run)
    entropy = work / "entropy"
    run.step("entropy-model", run.task("entropy", "--out", str(entropy), "--json", str(work / "entropy.json")), 60,
             data=work / "entropy.json")
    cuda_skip = None if dry or run.cuda else NO_CUDA
    common = ["--entropy-model", str(entropy), "--data", *data, "--device", run.device, "--seed", "0", "--no-progress"]
    if not dry:  # the loader thread and the patch layouts run on the host: give them cores
        common += ["--threads", "8"]
    if dry:
        # float32: on a CPU bfloat16's first steps are oneDNN kernel set-up, seconds of the dry run
        shape = ["--preset", "tiny", "--batch-size", "2", "--seq-len", "64", "--block-sizes", "4", "8",
                 "--lr", "3e-3", "--warmup-steps", "1", "--no-bf16"]
    else:
        shape = ["--preset", SHIPPED_PRESET, "--batch-size", str(run.args.train_batch_size), "--seq-len", "512",
                 "--block-sizes", "4", "8", "--lr", str(run.args.train_lr), "--warmup-steps", "100"]
    # a pilot of a few steps measures this machine's step rate, so that the cosine schedule of the real
    # run (--steps) ends where its time budget does, instead of being cut at a high learning rate
    pilot = work / "pilot"
    record = run.step("train-pilot", run.cli("train", "blt", *common, *shape, "--out", str(pilot), "--steps", "40",
                                             "--eval-every", "1000000", "--checkpoint-every", "1000000",
                                             "--eval-bytes-final", "256"), 120,
                      skip="dry run: a fixed 4 steps (a pilot costs the dry run 20 s of start-up)" if dry else cuda_skip)
    rate = _pilot_rate(pilot) if record["status"] == "ok" else None
    step_bytes = (2 * 63) if dry else run.args.train_batch_size * 511
    left = run.deadline - time.monotonic()
    # the training time budget: what the part has left, less start-up, the final evaluation and saves, and the export
    budget = 10.0 if dry else max(30.0, min(run.args.train_seconds, left - 120))
    # 95 %: the periodic evaluations and checkpoints of the real run take some of its budget
    steps = 4 if dry else (max(200, int(0.95 * rate * budget / step_bytes)) if rate else 3000)
    record["data"] = {"bytes_per_s": rate, "train_time_budget_s": budget, "steps_chosen": steps}
    run.save()
    run_dir = work / "run"
    run.step("train", run.cli("train", "blt", *common, *shape, "--out", str(run_dir), "--steps", str(steps),
                              "--time-budget", str(int(budget)), "--eval-every", "1000000" if dry else "500",
                              "--eval-bytes", "256" if dry else "8192", "--eval-bytes-final", "512" if dry else "65536",
                              "--checkpoint-every", "1000000" if dry else "1000"),
             budget + (60 if dry else 150), skip=cuda_skip, data=run_dir / "training.json")
    run.step("export-model", run.task("export", "--run", str(run_dir), "--out", str(run.out),
                                      "--json", str(work / "export.json")), 60,
             skip=None if (run_dir / "final" / "config.json").is_file() else "no final model to export",
             data=work / "export.json")
    # the run's log (one record per step) travels in artifacts.tar.gz
    if (run_dir / "log.jsonl").is_file():
        shutil.copy(run_dir / "log.jsonl", work / "train-log.jsonl")
        run.save()


def _corpus_step(run: Run) -> list[str]:
    """The training data: the carried code corpus (unpacked here) plus the stdlib and the carried plays."""
    work = run.work
    if run.dry:
        run.step("corpus", run.cli("corpus", "build", "code", "--out", str(work / "corpora" / "code"), "--dist", "attrs",
                                   "pluggy", "--max-bytes", "400000"), 60)
        return [str(work / "corpora" / "code")]
    code = CARRY / "code-corpus.tar"
    plays = CARRY / "plays.tar.gz"
    cache = work / "cache"
    script = (f"set -e; mkdir -p {work}/corpora {cache}; tar -xf {code} -C {work}/corpora; "
              f"if [ -f {plays} ]; then tar -xzf {plays} -C {cache}; fi; ls -la {work}/corpora/code")
    run.step("corpus", ["sh", "-c", script], 60,
             skip=None if code.is_file() else f"no carried corpus {code} (docs/training.md, GPU run)")
    run.env["BLT_DECODE_CACHE"] = str(cache)
    data = [str(work / "corpora" / "code"), "stdlib"]
    if (cache / "plays").is_dir():
        data.append("plays")
    return data


def _pilot_rate(run_dir: Path) -> float | None:
    """Training bytes/s of the pilot's later steps (its first ones carry start-up and kernel selection)."""
    try:
        log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    except (OSError, ValueError):
        return None
    if len(log) < 3:
        return None
    first, last = log[len(log) // 3], log[-1]
    seconds = last["wall_time_s"] - first["wall_time_s"]
    return (last["bytes_seen"] - first["bytes_seen"]) / seconds if seconds > 0 else None


# -- the summary ---------------------------------------------------------------------------------------
def summary_markdown(results: dict[str, Any]) -> str:
    facts = results.get("facts", {})
    lines = [f"# GPU check{' (dry run, CPU)' if results.get('dry_run') else ''}: part {results.get('parts')}", "",
             f"- checkout {results.get('checkout')}; started {results.get('started_utc')}, last write {results.get('finished_utc')}",
             f"- GPU: {facts.get('gpu_name', '-')}; torch {facts.get('torch', '-')}, CUDA {facts.get('cuda', '-')}, "
             f"transformers {facts.get('transformers', '-')}, Python {facts.get('python', '-')}; device used: {facts.get('device_used', '-')}",
             "", "| step | part | status | seconds | note |", "|---|---|---|---:|---|"]
    steps = results.get("steps", [])
    for s in steps:
        note = (s.get("reason") or "").replace("|", "/")[:160]
        lines.append(f"| {s['name']} | {s['part']} | {s['status']} | {s['seconds']:.1f} | {note} |")
    by_name = {s["name"]: s for s in steps}
    roof = (by_name.get("roofline") or {}).get("data") or {}
    if roof:
        lines += ["", f"HBM roofline: matrix-vector {roof.get('matvec_gb_per_s', 0):.0f} GB/s "
                      f"({roof.get('matrix_mib')} MiB {roof.get('dtype')} matrix, L2 {roof.get('l2_mib')} MiB); "
                      f"device-to-device copy {roof.get('copy_gb_per_s', 0):.0f} GB/s (read + write)"]
    bench_rows = []
    for s in steps:
        if s["name"].startswith("bench-") and s["status"] == "ok" and s.get("data"):
            d = s["data"]
            label = s["name"].removeprefix("bench-")
            model, backend = label.rsplit("-", 1)
            warm = (d.get("warmup_s") or {}).get(backend)
            by_strategy = {r["label"]: r for r in d.get("rows", [])}
            for t in d.get("throughput", []):
                one = by_strategy.get(t["label"], {})
                gbs = one.get("weight_gb_per_second") if t["batch_size"] == 1 else None
                share = f"{gbs / roof['matvec_gb_per_s']:.1%}" if gbs and roof.get("matvec_gb_per_s") else "-"
                bench_rows.append(f"| {model} | {backend} | {t['label']} | {t['batch_size']} | {t['bytes_per_second']:.1f} | "
                                  f"{'-' if gbs is None else round(gbs, 2)} | {share} | {'-' if warm is None else round(warm, 1)} | "
                                  f"{t.get('same_as_smallest_batch')} |")
    if bench_rows:
        lines += ["", "Decoding (new bytes/s over all prompts; weight GB/s is batch 1 alone, all prompts one by one):", "",
                  "| model | backend | strategy | batch | bytes/s | weight GB/s | % of roofline | warm-up s | same as batch 1 |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|", *bench_rows]
    hf = (by_name.get("hf-generate-blt1b") or {}).get("data") or {}
    if hf:
        lines += ["", f"transformers' BltForCausalLM.generate on the BLT-1B-shaped weights ({hf.get('dtype')}, "
                      f"{hf.get('prompts')} prompts x {hf.get('new_bytes')} bytes, greedy): {hf.get('hf_bytes_per_s')} bytes/s "
                      f"(use_cache={hf.get('hf_use_cache')}); ours, eager AR on the same prompts: {hf.get('ours_bytes_per_s')} bytes/s; "
                      f"same bytes: {hf.get('same_output')} (bfloat16 near-ties of random weights can differ)"]
    tb = (by_name.get("train-bench") or {}).get("data") or {}
    for row in tb.get("rows", []):
        lines += ["", f"train-bench {row['preset']} {row['precision']} {row['batch_size']} x {row['seq_len']} on "
                      f"{tb.get('device')}: {row['bytes_per_s']:.0f} training bytes/s, MFU {row['mfu']:.1%} "
                      f"(bf16 GEMM {tb.get('gemm_bf16_gflops', 0):.0f} GFLOP/s), warm-up {row['warmup_s']:.1f} s"]
    train = (by_name.get("train") or {}).get("data") or {}
    if train:
        lines += ["", f"Training (part B): {train.get('steps')} steps, {train.get('bytes_seen')} bytes in "
                      f"{train.get('wall_time_s', 0):.0f} s ({train.get('bytes_per_s', 0):.0f} bytes/s) on {train.get('device')}; "
                      f"held-out bits/byte {json.dumps(train.get('heldout_bpb'))}"]
    export = (by_name.get("export-model") or {}).get("data") or {}
    if export:
        lines += ["", f"Model pieces in $OUT: {', '.join(export.get('pieces', []))}; reassemble with "
                      f"`cat {export.get('file')}.part-* > model.safetensors` (sha256 {export.get('sha256')}) beside "
                      f"`{export.get('config')}` renamed config.json"]
    return "\n".join(lines) + "\n"


# -- tasks: the steps' own Python, run as subprocesses of this file ------------------------------------
def task_facts(args: argparse.Namespace) -> dict[str, Any]:
    import platform

    import torch

    facts: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                             "cuda_available": torch.cuda.is_available(), "machine": platform.machine(),
                             "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts.update(gpu_name=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                     multiprocessors=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                     l2_mib=round(getattr(props, "L2_cache_size", 0) / 2**20, 1))
    for name in ("transformers", "greenlet", "triton", "blt_decode"):
        try:
            module = __import__(name)
            facts[name] = getattr(module, "__version__", "present")
        except ImportError:
            facts[name] = None
    from blt_decode.plugins import registry as plugins
    facts["backends"] = plugins.backend_names()
    facts["strategies"] = plugins.strategy_names()
    return facts


def task_roofline(args: argparse.Namespace) -> dict[str, Any]:
    """Weight-streaming ceilings: ``W @ x`` over a bf16 matrix of ``--mib`` MiB (on the GPU far larger than
    its L2, so every byte comes from HBM), and a device-to-device copy, timed with CUDA events (median of
    20 after warm-ups; on the CPU with the clock)."""
    import torch

    device = args.device
    mib = args.mib
    cols = 8192
    rows = (mib << 20) // (cols * 2)
    weights = torch.randn(rows, cols, device=device, dtype=torch.bfloat16)  # random: zeros can run faster
    x = torch.randn(cols, device=device, dtype=torch.bfloat16)
    nbytes = weights.numel() * 2

    def timed(fn: Any, reps: int = 20) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(reps):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    matvec = timed(lambda: torch.mv(weights, x))
    flat = weights.view(-1)
    copy_to = torch.empty_like(flat)
    copy = timed(lambda: copy_to.copy_(flat))
    l2 = None
    if device == "cuda":
        l2 = round(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0) / 2**20, 1)
    return {"device": device, "dtype": "bfloat16", "matrix_mib": nbytes >> 20, "l2_mib": l2,
            "matvec_gb_per_s": nbytes / matvec / 1e9, "matvec_s": matvec,
            "copy_gb_per_s": 2 * nbytes / copy / 1e9, "copy_s": copy}


def task_build_model(args: argparse.Namespace) -> dict[str, Any]:
    """A random model of a training preset's shape, saved native (docs/benchmarks.md: the BLT-1B shape with
    small hash tables, which are looked up, not streamed, so they do not change the weight rate)."""
    import attrs
    import torch

    import blt_decode as bd
    from blt_decode.checkpoints import formats
    from blt_decode.checkpoints.resolve import random_presets

    config = attrs.evolve(random_presets()[args.preset], encoder_hash_byte_group_vocab=args.hash_vocab)
    start = time.perf_counter()
    torch.set_num_threads(os.cpu_count() or 1)
    model = bd.random_model(config, dtype=getattr(torch, args.dtype))
    formats.save_checkpoint(model, args.out, "native")
    counts = model.param_counts()
    return {"preset": args.preset, "dtype": args.dtype, "seconds": time.perf_counter() - start,
            "parameters": sum(p.numel() for p in model.parameters()),
            "per_step_weights": {"encoder": counts.encoder, "global": counts.global_, "decoder": counts.decoder}}


def task_hf_generate(args: argparse.Namespace) -> dict[str, Any]:
    """transformers' own BLT greedy generation on the same weights (converted to its layout), timed beside
    our eager AR on the same prompts in the same process (the outside reference of issue 35)."""
    import torch
    from transformers import BltForCausalLM

    import blt_decode as bd
    from blt_decode.checkpoints import formats
    from blt_decode.decoding.sampling import NEVER_GENERATED
    from blt_decode.model import tokenizer
    from blt_decode.tools.prompt_sets import load

    device = args.device
    # converted on the CPU (the writers read tensors there), then both models moved to the device
    model = bd.load_model(args.model, dtype=getattr(torch, args.dtype))
    prompts = [p.prompt for p in load("heldout-code", args.prompts)]
    hf_dir = Path(tempfile.mkdtemp(prefix="hf-blt-"))
    formats.save_checkpoint(model, hf_dir, "hf")
    hf = BltForCausalLM.from_pretrained(hf_dir, dtype=model.dtype).to(device).eval()
    shutil.rmtree(hf_dir, ignore_errors=True)
    model = model.to(device)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def hf_run(use_cache: bool, prompts: list[bytes] = prompts, new_bytes: int = args.new_bytes) -> tuple[float, list[bytes]]:
        outs, total = [], 0
        sync()
        start = time.perf_counter()
        with torch.no_grad():
            for p in prompts:
                ids = torch.tensor([tokenizer.encode(p)], device=device)
                out = hf.generate(ids, max_new_tokens=new_bytes, min_new_tokens=new_bytes, do_sample=False,
                                  use_cache=use_cache, suppress_tokens=list(NEVER_GENERATED), eos_token_id=None,
                                  pad_token_id=tokenizer.PAD_ID)
                new = out[0, ids.shape[1]:].tolist()
                total += len(new)
                outs.append(tokenizer.decode(new))
        sync()
        return total / (time.perf_counter() - start), outs

    result: dict[str, Any] = {"dtype": str(model.dtype).removeprefix("torch."), "prompts": len(prompts),
                              "new_bytes": args.new_bytes, "device": device}
    hf_run(False, prompts[:1], 4)  # warm-up (kernel selection, allocator)
    for use_cache in (True, False):  # its cache when it has one; the re-run forward as bench's --compare-hf does
        try:
            rate, hf_outs = hf_run(use_cache)
        except Exception as exc:  # noqa: BLE001 - a reference that cannot run is reported, not fatal
            result[f"hf_error_use_cache_{use_cache}"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            continue
        result.update(hf_bytes_per_s=round(rate, 2), hf_use_cache=use_cache)
        break
    bd.generate(model, prompts[0], max_new_bytes=8)  # warm-up
    sync()
    start = time.perf_counter()
    ours = [bd.generate(model, p, max_new_bytes=args.new_bytes) for p in prompts]
    sync()
    result["ours_bytes_per_s"] = round(sum(g.stats.new_bytes for g in ours) / (time.perf_counter() - start), 2)
    if "hf_bytes_per_s" in result:
        result["same_output"] = f"{sum(a == g.output for a, g in zip(hf_outs, ours))} of {len(prompts)}"
    return result


def task_entropy(args: argparse.Namespace) -> dict[str, Any]:
    """The shipped default model's entropy model, as a byte-LM checkpoint for ``train blt --entropy-model``:
    the BLT-D model is trained from scratch on top of it (docs/training.md, GPU run), so its patching is
    the shipped model's and no GPU minute goes to an entropy model."""
    import blt_decode as bd
    from blt_decode.training.checkpoints import save_byte_lm

    model = bd.load_model("default")
    save_byte_lm(model.entropy_model, args.out, metadata={"from": "blt_decode/default_model (entropy_model.*)"})
    return {"from": "default", "parameters": sum(p.numel() for p in model.entropy_model.parameters())}


def task_export(args: argparse.Namespace) -> dict[str, Any]:
    """The final model in bfloat16 (as the default model ships), its safetensors cut into pieces of at
    most 15 MiB in $OUT, with the sha256 of the whole file and of every piece."""
    import torch

    from blt_decode.checkpoints import formats
    from blt_decode.checkpoints.native import load_native

    run = Path(args.run)
    model = load_native(run / "final").to(torch.bfloat16)
    tmp = Path(tempfile.mkdtemp(prefix="export-"))
    formats.save_checkpoint(model, tmp / "model", "native")
    out = Path(args.out)
    data = (tmp / "model" / "model.safetensors").read_bytes()
    pieces = []
    for index in range(0, max(len(data), 1), PIECE_BYTES):
        name = f"model.safetensors.part-{index // PIECE_BYTES:02d}"
        (out / name).write_bytes(data[index:index + PIECE_BYTES])
        pieces.append(name)
    shutil.copy(tmp / "model" / "config.json", out / "model-config.json")
    shutil.rmtree(tmp, ignore_errors=True)
    return {"file": "model.safetensors", "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "pieces": pieces, "piece_sha256": {n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in pieces},
            "config": "model-config.json", "dtype": "bfloat16"}


# -- preparing the carried folder, on the CPU machine (network: PyPI for the wheel only) ---------------------
#: the carried corpus keeps the held-out shard and training shards up to this many MB: the issue allows 40,
#: but the checkout (28 MiB, the default model most of it) and what is carried travel together, 64 MiB at most
CARRY_CORPUS_MB = 30
#: the device tool's limit on the checkout plus the carried paths
TRAVEL_LIMIT = 64 << 20


def shipped_corpus_distributions() -> list[str]:
    """The distributions of the code corpus the shipped default model was trained on, from the corpus
    version string in its config (``blt-code-v1+pyX.Y+NAME-VERSION+...+DIGEST``)."""
    import re

    config = json.loads((ROOT / "blt_decode" / "default_model" / "config.json").read_text())
    version = config["metadata"]["corpus"].split("|")[0]
    names = []
    for token in version.split("+")[2:-1]:
        match = re.match(r"^(.*)-([0-9][^-]*)$", token)
        if match:  # a bare token is a local version's suffix (torch-2.13.0+cpu)
            names.append(match.group(1))
    return names


def prepare_carry(python: str) -> int:
    """Fill gpu-carry/ (git-ignored) with what part B and the installs need: greenlet's cp312 manylinux
    wheel, the code corpus rebuilt from the shipped model's distributions (the same held-out split) with
    training shards cut to fit CARRY_CORPUS_MB, and the plays from the cache (``corpus fetch plays``)."""
    (CARRY / "wheels").mkdir(parents=True, exist_ok=True)
    subprocess.run([python, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                    "--implementation", "cp", "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_24_x86_64",
                    "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64", "-d", str(CARRY / "wheels"),
                    "greenlet"], check=True)
    with tempfile.TemporaryDirectory(prefix="carry-corpus-") as tmp:
        code = Path(tmp) / "code"
        subprocess.run([python, "-m", "blt_decode", "corpus", "build", "code", "--out", str(code),
                        "--dist", *shipped_corpus_distributions()], check=True, stdout=subprocess.DEVNULL)
        manifest = json.loads((code / "corpus.json").read_text())
        total = len([s for s in manifest["shards"] if s["split"] == "train"])
        kept, size, full = [], 0, False
        for shard in manifest["shards"]:  # every held-out shard; the training shards' prefix that fits
            nbytes = (code / shard["file"]).stat().st_size
            if shard["split"] == "train" and (full or size + nbytes > CARRY_CORPUS_MB * 10**6):
                full = True  # a prefix, so that the version's "first N" is true
                (code / shard["file"]).unlink()
                continue
            kept.append(shard)
            size += nbytes
        n_train = len([s for s in kept if s["split"] == "train"])
        manifest["shards"] = kept
        # the version names the cut, so a checkpoint trained on it never claims the whole corpus
        manifest["version"] += f"+first-{n_train}-of-{total}-train-shards"
        manifest["train_bytes"] = sum(s["text_bytes"] for s in kept if s["split"] == "train")
        (code / "corpus.json").write_text(json.dumps(manifest, indent=1) + "\n")
        with tarfile.open(CARRY / "code-corpus.tar", "w") as tar:  # the shards are gzip already
            tar.add(code, arcname="code")
    cache = Path(os.environ.get("BLT_DECODE_CACHE") or Path.home() / ".cache" / "blt-decode")
    if (cache / "plays").is_dir():
        with tarfile.open(CARRY / "plays.tar.gz", "w:gz") as tar:
            tar.add(cache / "plays", arcname="plays")
    else:
        print(f"gpu-check: no plays in {cache}: run `blt-decode corpus fetch plays` first, or train without them")
    carried = sum(p.stat().st_size for p in CARRY.rglob("*") if p.is_file())
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True).stdout
    checkout = sum((ROOT / f).stat().st_size for f in tracked.decode().split("\0") if f and (ROOT / f).is_file())
    for path in sorted(CARRY.rglob("*")):
        if path.is_file():
            print(f"{path.stat().st_size / 2**20:8.1f} MiB  {path.relative_to(ROOT)}")
    print(f"checkout {checkout / 2**20:.1f} MiB + carried {carried / 2**20:.1f} MiB = {(checkout + carried) / 2**20:.1f} MiB "
          f"of the tool's {TRAVEL_LIMIT >> 20} MiB")
    return 0 if checkout + carried < TRAVEL_LIMIT else 1


TASKS = {"facts": task_facts, "roofline": task_roofline, "build-model": task_build_model,
         "hf-generate": task_hf_generate, "entropy": task_entropy, "export": task_export}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu-check", description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU, seconds (CI)")
    parser.add_argument("--part", choices=("A", "B", "all"), default="all",
                        help="A: tests and benches (<= 5 min); B: training (<= 8 min); all: both (dry runs; on the "
                             "GPU one part per call, each call is at most 10 minutes) (default: %(default)s)")
    parser.add_argument("--prepare-carry", action="store_true",
                        help="on the CPU machine, before a GPU run: fill gpu-carry/ (greenlet wheel, code corpus, plays)")
    parser.add_argument("--only", default=None, metavar="NAME,...",
                        help="run only the steps whose names match these patterns (fnmatch), e.g. 'bench-*-static'")
    parser.add_argument("--out", default=os.environ.get("OUT") or "out-gpu-dry", help="results folder (default: $OUT)")
    parser.add_argument("--train-seconds", type=float, default=300.0, help="part B's training time budget at most")
    parser.add_argument("--train-batch-size", type=int, default=32, help="part B's batch (sequences of 512 bytes)")
    parser.add_argument("--train-lr", type=float, default=3e-3, help="part B's peak learning rate")
    # the tasks (internal: run by the steps)
    parser.add_argument("--task", choices=sorted(TASKS), help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--mib", type=int, default=64, help=argparse.SUPPRESS)
    parser.add_argument("--preset", default="tiny", help=argparse.SUPPRESS)
    parser.add_argument("--hash-vocab", type=int, default=4099, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="bfloat16", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--prompts", type=int, default=4, help=argparse.SUPPRESS)
    parser.add_argument("--new-bytes", type=int, default=32, help=argparse.SUPPRESS)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.task:
        result = TASKS[args.task](args)
        print(json.dumps(result, default=str))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1, default=str) + "\n")
        return 0

    if args.prepare_carry:
        return prepare_carry(sys.executable)
    run = Run(args)
    parts = ["A", "B"] if args.part == "all" else [args.part]
    failed = False
    try:
        for part in parts:
            run.part = part
            run.deadline = time.monotonic() + PART_SECONDS[part]
            if part == parts[0]:
                setup_steps(run)
            (part_a if part == "A" else part_b)(run)
    finally:
        run.save()
        failed = any(s["status"] in ("failed", "timeout") for s in run.results["steps"])
        shutil.rmtree(run.work, ignore_errors=True)
    print(f"gpu-check: wrote {run.out}/results.json, summary.md, steps.log, artifacts.tar.gz", flush=True)
    print(summary_markdown(run.results))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
