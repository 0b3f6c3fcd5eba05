"""``blt-decode train-bench``: training throughput of model shapes x precisions, side by side
(docs/training.md, "Throughput (measured)")."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import attrs
import torch

from blt_decode.errors import TrainingError

#: the matrix product whose bfloat16 rate MFU is measured against (the shapes of the issue's measurement)
GEMM_SHAPE = (2048, 256, 704)
#: on CUDA: a product large enough to reach the matrix units' rate (the 2048 x 256 x 704 one is launch-bound there)
CUDA_GEMM_SHAPE = (8192, 8192, 8192)
PRECISIONS = ("float32", "bfloat16")


@attrs.frozen
class TrainBenchRow:
    """One model shape (``preset``) in one precision: its training speed, MFU and memory, measured in
    subprocesses."""

    preset: str
    precision: str
    batch_size: int
    seq_len: int
    block_sizes: tuple[int, ...]
    steps: int  #: timed steps per repeat (after the warm-up steps)
    compile: bool  #: the loop's --compile
    bytes_per_s: float  #: median over repeats of training bytes/s in the timed steps
    bytes_per_s_runs: tuple[float, ...]
    model_tflop_per_step: float
    mfu: float  #: model FLOP/s over the bfloat16 GEMM rate of the same run
    peak_rss_mb: float  #: the largest peak resident memory of the subprocesses measuring this row
    trainable_params: int
    warmup_s: float  #: median wall time of the untimed first steps (compilation, with --compile)
    peak_cuda_mb: float | None = None  #: the largest CUDA memory peak of the subprocesses (None on CPU)


@attrs.frozen
class TrainBenchResult:
    """A ``train-bench`` run: its rows, the GEMM rates MFU is measured against, the threads, the data and the
    device."""

    rows: tuple[TrainBenchRow, ...]
    gemm_bf16_gflops: float
    gemm_f32_gflops: float
    threads: int
    data: tuple[str, ...]
    device: str = "cpu"

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


def gemm_rate(dtype: torch.dtype, shape: tuple[int, int, int] | None = None, seconds: float = 0.2,
              windows: int = 5, device: str = "cpu") -> float:
    """GFLOP/s of an ``[m, k] x [k, n]`` matrix product in ``dtype`` (this process's thread setting): the
    best of ``windows`` timings of ``seconds`` each, since a busy machine only ever slows a window down
    and MFU is measured against what the hardware attains. On CUDA the device is synchronised before
    each clock read (its products are asynchronous)."""
    m, k, n = shape or (CUDA_GEMM_SHAPE if device == "cuda" else GEMM_SHAPE)
    a, b = torch.randn(m, k, device=device).to(dtype), torch.randn(k, n, device=device).to(dtype)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):
        a @ b
    sync()
    best = 0.0
    for _ in range(windows):
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            reps += 1
            sync()
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - start) / 1e9)
    return best


def model_flops_per_step(model: Any, batches: Sequence[torch.Tensor], block_sizes: Sequence[int], first: int) -> float:
    """Mean FLOPs per step (forward + backward = 6 x parameters x positions per stack) over the batches
    of steps ``first..``: encoder over every byte, global model over every patch, decoder over every byte
    and every real block byte (the block size of each step, as the loop cycles them)."""
    from blt_decode.training.objective import make_blocks

    counts = model.param_counts()
    total = 0.0
    for offset, ids in enumerate(batches):
        step = first + offset
        with torch.no_grad():
            layout = model.patch_layout(ids)
        blocks = make_blocks(ids, layout, block_sizes[step % len(block_sizes)], torch.Generator().manual_seed(0))
        positions = ids.numel()
        patches = sum(len(s) - 1 for s in layout.starts)
        total += 6 * (counts.encoder * positions + counts.global_ * patches
                      + counts.decoder * (positions + int(blocks.valid.sum())))
    return total / len(batches)


def measure_one(preset: str, precision: str, *, batch_size: int, seq_len: int, steps: int, warmup: int,
                threads: int, data: Sequence[str], block_sizes: Sequence[int], compile: bool = False,
                device: str = "cpu") -> dict[str, Any]:
    """One configuration, in this process: ``warmup + steps`` steps of the training loop."""
    from blt_decode.model.blt import EntropyModel
    from blt_decode.model.presets import ENTROPY_PRESETS
    from blt_decode.model.tokenizer import VOCAB_SIZE
    from blt_decode.tools.corpus import BatchSampler
    from blt_decode.training.checkpoints import save_byte_lm
    from blt_decode.training.config import TrainConfig
    from blt_decode.training.data import load_data
    from blt_decode.training.loop import LOG_FILE, _init_stack, train

    torch.set_num_threads(threads)
    corpus = load_data(tuple(data))
    with tempfile.TemporaryDirectory(prefix="blt-train-bench-") as tmp:
        entropy = _init_stack(EntropyModel(ENTROPY_PRESETS["default"], VOCAB_SIZE), torch.Generator().manual_seed(0))
        save_byte_lm(entropy, Path(tmp) / "entropy")
        config = TrainConfig(kind="blt", out_dir=str(Path(tmp) / "run"), preset=preset, seq_len=seq_len,
                             batch_size=batch_size, steps=warmup + steps, lr=1e-3, warmup_steps=1,
                             eval_every=10**9, eval_bytes_final=1, checkpoint_every=10**9,
                             bf16=precision == "bfloat16", threads=threads, entropy_model=str(Path(tmp) / "entropy"),
                             block_sizes=tuple(block_sizes), synthetic_data=True, data=tuple(data), compile=compile,
                             device=device)
        train(config, corpus=corpus, progress=False, log=lambda message: None)
        log = [json.loads(line) for line in (Path(config.out_dir) / LOG_FILE).read_text().splitlines()]
        first, last = log[warmup - 1], log[-1]
        rate = (last["bytes_seen"] - first["bytes_seen"]) / (last["wall_time_s"] - first["wall_time_s"])
        from blt_decode.checkpoints.native import load_native

        model = load_native(Path(config.out_dir) / "final")
    sampler = BatchSampler(corpus.train_stream, seq_len, batch_size, config.seed)
    batches = [torch.as_tensor(sampler.batch(s)) for s in range(warmup, warmup + steps)]
    flops = model_flops_per_step(model, batches, block_sizes, warmup)
    trainable = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("entropy_model."))
    import resource

    return {"bytes_per_s": rate, "flops_per_step": flops, "step_bytes": batch_size * (seq_len - 1),
            "trainable_params": trainable, "warmup_s": first["wall_time_s"],
            # the process's peak resident memory (KiB on Linux): model, optimizer state, activations (on
            # CUDA the host side only; the GPU's peak is peak_cuda_mb)
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None}


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run :func:`measure_one` in a subprocess of its own (its peak memory is then its own)."""
    proc = subprocess.run([sys.executable, "-m", "blt_decode.training.throughput", json.dumps(spec)],
                          capture_output=True, text=True)
    if proc.returncode:
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit status {proc.returncode}"
        raise TrainingError(f"train-bench {spec['preset']} {spec['precision']} failed in its subprocess: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(presets: Sequence[str], precisions: Sequence[str], *, batch_size: int = 8, seq_len: int = 512,
        steps: int = 4, warmup: int = 2, repeats: int = 1, threads: int | None = None,
        data: Sequence[str] = ("builtin",), block_sizes: Sequence[int] = (4, 8, 16), compile: bool = False,
        progress: Any = None, device: str = "cpu") -> TrainBenchResult:
    """Every (preset, precision) for ``repeats`` rounds, alternating; see docs/training.md (train-bench)."""
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("train-bench --device cuda: no CUDA device is available here (use --device cpu)")
    gemm = {dtype: gemm_rate(dtype, device=device) for dtype in (torch.bfloat16, torch.float32)}
    configs = [(p, q) for p in presets for q in precisions]
    results: dict[tuple[str, str], list[dict[str, Any]]] = {c: [] for c in configs}
    for _ in range(repeats):
        for preset, precision in configs:
            spec = dict(preset=preset, precision=precision, batch_size=batch_size, seq_len=seq_len, steps=steps,
                        warmup=warmup, threads=threads, data=list(data), block_sizes=list(block_sizes), compile=compile,
                        device=device)
            results[(preset, precision)].append(_child(spec))
            if progress is not None:
                progress(preset, precision, results[(preset, precision)][-1]["bytes_per_s"])
    rows = []
    for (preset, precision), runs in results.items():
        rates = tuple(r["bytes_per_s"] for r in runs)
        rate = statistics.median(rates)
        first = runs[0]
        step_s = first["step_bytes"] / rate
        rows.append(TrainBenchRow(preset, precision, batch_size, seq_len, tuple(block_sizes), steps, compile, rate,
                                  rates, first["flops_per_step"] / 1e12,
                                  first["flops_per_step"] / step_s / (gemm[torch.bfloat16] * 1e9),
                                  max(r["peak_rss_mb"] for r in runs), first["trainable_params"],
                                  statistics.median(r["warmup_s"] for r in runs),
                                  max((r.get("peak_cuda_mb") or 0.0) for r in runs) if device == "cuda" else None))
    return TrainBenchResult(tuple(rows), gemm[torch.bfloat16], gemm[torch.float32], threads, tuple(data), device)


def markdown(result: TrainBenchResult) -> str:
    """The result as a markdown table (bytes/s, their ratio to the first row of the same preset, MFU)."""
    compiled = " (--compile)" if result.rows and result.rows[0].compile else ""
    shape = CUDA_GEMM_SHAPE if result.device == "cuda" else GEMM_SHAPE
    lines = [f"bfloat16 GEMM {shape[0]}x{shape[1]}x{shape[2]} on {result.device}: {result.gemm_bf16_gflops:.0f} GFLOP/s "
             f"(float32 {result.gemm_f32_gflops:.0f}); torch threads = {result.threads}; data {' '.join(result.data)}{compiled}",
             "", "| preset | precision | batch x seq | bytes/s | vs first row | TFLOP/step | MFU | peak RSS MB | warm-up s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    base: dict[str, float] = {}
    for row in result.rows:
        base.setdefault(row.preset, row.bytes_per_s)
        lines.append(f"| {row.preset} | {row.precision} | {row.batch_size} x {row.seq_len} | {row.bytes_per_s:.0f} | "
                     f"{row.bytes_per_s / base[row.preset]:.2f}x | {row.model_tflop_per_step:.3f} | {row.mfu:.1%} | "
                     f"{row.peak_rss_mb:.0f} | {row.warmup_s:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":  # one measurement, run by _child
    spec = json.loads(sys.argv[1])
    print(json.dumps(measure_one(spec.pop("preset"), spec.pop("precision"), **spec)))
