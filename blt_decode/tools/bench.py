"""``blt-decode bench``: strategies × backends on one model over a versioned prompt set, side by side
(the columns: docs/benchmarks.md)."""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import attrs
import torch
from tqdm import tqdm

from blt_decode import api
from blt_decode.decoding import options
from blt_decode.decoding.stats import DecodeStats, ForwardPasses, bandwidth_gb
from blt_decode.errors import BLTDecodeError, install_hint
from blt_decode.model import tokenizer
from blt_decode.model.blt import BLTModel, ParamCounts
from blt_decode.model.config import BLTConfig, TransformerConfig, ffn_dim_for
from blt_decode.model.stacks import Stack
from blt_decode.plugins import registry as plugins
from blt_decode.tools.prompt_sets import Prompt


# -- what runs --------------------------------------------------------------------------------------
@attrs.frozen
class StrategySpec:
    """One strategy setting of a run, as :func:`parse_strategies` reads it: the text given (``label``), the
    strategy's canonical name and its parsed options."""

    label: str
    strategy: str
    options: dict[str, Any]


def parse_strategies(text: str) -> list[StrategySpec]:
    """``ar,blt-s:k=4,blt-d:block_size=8+rule=entropy`` → specs (options joined with ``+``, each value
    parsed by the option's declared type). Unknown strategies and bad options fail here, before any work."""
    specs = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, opts = item.partition(":")
        strategy = plugins.get_strategy(name.strip())  # unknown names fail here, listing the registered ones
        parsed = options.parse_option_strings(strategy, [p for p in opts.split("+") if p])
        options.make_options(strategy, parsed)
        specs.append(StrategySpec(item, strategy.name, parsed))
    return specs


# -- which autoregressive row each row is compared with ------------------------------------------------
SamplingKey = tuple[float, Any, Any]

GREEDY_KEY: SamplingKey = (0.0, None, None)


def sampling_key(options: dict[str, Any]) -> SamplingKey:
    """(temperature, top_k, top_p) of a spec's options; every greedy spec shares one key."""
    temperature = float(options.get("temperature") or 0.0)
    if temperature == 0.0:
        return GREEDY_KEY
    return temperature, options.get("top_k"), options.get("top_p")


def is_ar_reference(spec: StrategySpec) -> bool:
    """Is ``spec`` an autoregressive row that other rows can be compared with (KV-cached AR)?"""
    return spec.strategy == "autoregressive" and spec.options.get("cache", "kv") == "kv"


def with_ar_references(specs: Sequence[StrategySpec]) -> list[StrategySpec]:
    """``specs`` with, for every sampling setting used, an autoregressive row with the same setting
    placed before the first row that uses it (moved there if given later, added if missing). Greedy rows
    are compared with AR greedy (always present); a sampled row, e.g. ``blt-s:k=8+temperature=0.7``,
    with ``ar:temperature=0.7``: the speculative sampler's output is distributed as that row's."""
    out: list[StrategySpec] = []
    placed: set[SamplingKey] = set()
    for key, spec in [(GREEDY_KEY, None)] + [(sampling_key(s.options), s) for s in specs]:
        if key not in placed:
            given = next((s for s in specs if is_ar_reference(s) and sampling_key(s.options) == key), None)
            if given is None:
                options = {} if key == GREEDY_KEY else {
                    name: value for name, value in zip(("temperature", "top_k", "top_p"), key) if value is not None}
                label = "ar" + (":" + "+".join(f"{k}={v}" for k, v in options.items()) if options else "")
                given = StrategySpec(label, "autoregressive", options)
            out.append(given)
            placed.add(key)
        if spec is not None and not any(spec is o for o in out):
            out.append(spec)
    return out


# -- projections onto the released sizes --------------------------------------------------------------
def _released(global_dim: int, global_layers: int, global_heads: int) -> BLTConfig:
    local = TransformerConfig(dim=1024, n_layers=1, n_heads=16, ffn_dim=ffn_dim_for(1024), sliding_window=512)
    return BLTConfig(
        encoder=local,
        global_=TransformerConfig(dim=global_dim, n_layers=global_layers, n_heads=global_heads, ffn_dim=ffn_dim_for(global_dim)),
        decoder=attrs.evolve(local, n_layers=9),
        entropy_model=TransformerConfig(dim=768, n_layers=14, n_heads=12, ffn_dim=ffn_dim_for(768), sliding_window=512),
        cross_attn_k=2, cross_attn_nheads=16,
    )


def released_param_counts() -> dict[str, ParamCounts]:
    """Parameters per module of BLT-1B (REFERENCE.md: encoder 1 layer d=1024, global 25 layers d=2048,
    decoder 9 layers d=1024) and of a BLT-3B *estimate* (same local models, a global model of 26 layers at
    d=3072 — an assumption: the 3B configuration is not in the papers' text we have), counted on the
    meta device from our own module definitions."""
    out = {}
    for name, cfg in (("BLT-1B", _released(2048, 25, 16)), ("BLT-3B (est.)", _released(3072, 26, 24))):
        with torch.device("meta"):
            out[name] = BLTModel(cfg).param_counts()
    return out


# -- the run ----------------------------------------------------------------------------------------
@attrs.frozen
class BenchRow:
    """One strategy on one backend over the prompt set: forward passes, Eq. 8 bandwidth, speed and agreement
    with its autoregressive reference row (the columns: docs/benchmarks.md)."""

    label: str
    strategy: str
    options: dict[str, Any]
    backend: str
    passes: ForwardPasses
    new_bytes: int
    bandwidth_gb: float
    #: Eq. 8 bandwidth per committed byte relative to the reference AR row's (None if either wrote nothing)
    bandwidth_vs_ar: float | None
    projected_vs_ar: dict[str, float | None]
    #: new bytes over the wall time of all prompts (median of the repeats)
    bytes_per_second: float
    #: median over prompts of the time to the first committed byte (prefill + first round), last repeat
    time_to_first_byte_s: float | None
    #: new bytes after each prompt's first chunk over the time after it, summed over prompts (last repeat)
    decode_bytes_per_second: float | None
    #: wall seconds of one pass over all prompts (median of the repeats)
    wall_s: float
    acceptance_rate: float | None
    #: share of outputs identical to the reference AR row's (None for sampled rows: a speculative sampler
    #: is distributed as AR sampling, but draws differently, so equality per seed means nothing)
    exact_match_vs_ar: float | None
    #: mean share of the reference AR continuation reproduced before the first difference (None if sampled)
    matching_prefix_vs_ar: float | None
    chrf: float | None
    bits_per_byte_under_ar: float
    denoise_passes_per_block: float | None
    #: committed bytes per block (BLT-D/BLT-DV; BLT-DV: the exact first byte + the accepted draft)
    bytes_per_block: float | None
    #: label of the autoregressive row the "vs AR" ratios and exact matches compare with
    reference: str = "ar"
    #: weights read per second of wall time, GB: every module's passes (the patcher's too) times its
    #: parameters times the model's bytes per parameter, over the same wall time as bytes/s
    weight_gb_per_second: float | None = None


@attrs.frozen
class BenchResult:
    """A ``bench`` run: the model, prompt set and settings, each backend's warm-up seconds, the rows, and
    transformers' greedy speed (``hf_note`` says why it was not measured)."""

    model: str
    prompt_set: str
    prompts: int
    max_new_bytes: int
    repeats: int
    threads: int
    warmup_s: dict[str, float]
    rows: list[BenchRow]
    hf_bytes_per_second: float | None = None
    hf_note: str | None = None
    #: batched-engine throughput rows (``--batch-sizes``); empty when not asked for
    throughput: list["ThroughputRow"] = attrs.field(factory=list)
    #: the matrix-vector roofline of this run (``--roofline``), None when not measured
    roofline: "Roofline | None" = None


@attrs.frozen
class ThroughputRow:
    """New bytes/s over all requests with the batched engine at one batch size (generate_many)."""

    label: str
    strategy: str
    options: dict[str, Any]
    backend: str
    batch_size: int
    requests: int
    new_bytes: int
    #: median over the repeats of one generate_many over every prompt
    wall_s: float
    bytes_per_second: float
    #: bytes/s divided by the same strategy's bytes/s at the smallest batch size measured
    speedup: float
    #: share of the engine's slots in use per step, and rows per batched decoder call
    occupancy: float
    rows_per_decoder_call: float
    #: share of requests whose output equals the smallest batch size's (1.0: batching changed nothing)
    same_as_smallest_batch: float
    #: bytes/s divided by the first backend's at the same strategy and batch size (same run)
    vs_first_backend: float = 1.0


@attrs.frozen
class Roofline:
    """Weight bytes per second of a matrix-vector product on a matrix larger than the last-level cache:
    the rate at which batch-1 decoding could at best stream a model's weights on this machine."""

    gb_per_second: float
    matrix_mb: float
    dtype: str
    cache_mb: float | None  #: the last-level cache the matrix had to exceed (None: not found, 1 GiB used)


def last_level_cache_bytes() -> int | None:
    """The largest CPU cache's size in bytes (Linux sysfs), or None where it cannot be read."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * scale)
        except ValueError:
            continue
    return max(sizes, default=None)


@torch.no_grad()
def matvec_roofline(dtype: torch.dtype, device: torch.device | str = "cpu", *, repeats: int = 5,
                    size: int | None = None) -> Roofline:
    """Time ``W @ x`` for a ``dtype`` matrix of ``size`` bytes (default: twice the last-level cache, at
    least 256 MiB) and report its bytes over the best time: the machine's streaming rate, which batch-1
    steps of a model larger than the cache are compared with."""
    cache = last_level_cache_bytes()
    if size is None:
        size = max(2 * cache, 256 << 20) if cache else 1 << 30
    element = torch.tensor([], dtype=dtype).element_size()
    cols = 4096
    rows = size // (cols * element)
    weights = torch.empty(rows, cols, dtype=dtype, device=device).normal_()
    x = torch.randn(cols, dtype=dtype, device=device)
    best = math.inf
    for _ in range(repeats + 1):  # the first touches the pages
        start = time.perf_counter()
        torch.mv(weights, x)
        best = min(best, time.perf_counter() - start)
    return Roofline(weights.numel() * element / best / 1e9, weights.numel() * element / 2**20, str(dtype).removeprefix("torch."),
                    cache / 2**20 if cache else None)


def weight_gb(passes: ForwardPasses, params: ParamCounts, bytes_per_param: int) -> float:
    """Weights read by these passes, GB, every module included (Eq. 8 leaves the patcher out)."""
    return (bandwidth_gb(passes, params, bytes_per_param) + passes.patcher * params.patcher * bytes_per_param / 1e9)


@torch.no_grad()
def continuation_bits(model: BLTModel, prompt: bytes, continuation: bytes) -> tuple[float, int]:
    """Total bits and byte count of ``continuation`` after ``prompt`` under the model's AR distribution."""
    if not continuation:
        return 0.0, 0
    ids = torch.tensor([tokenizer.encode(prompt + continuation)], device=model.device)
    logp = torch.log_softmax(model(ids).double(), dim=-1)[0, :-1]
    picked = logp.gather(-1, ids[0, 1:, None])[:, 0][len(prompt):]
    return float(-picked.sum() / math.log(2)), len(continuation)


def _chrf(hypotheses: list[bytes], references: list[bytes]) -> float | None:
    try:
        import sacrebleu
    except ImportError:
        return None
    pairs = [(h, r) for h, r in zip(hypotheses, references) if r]
    if not pairs:
        return None
    hyp = [tokenizer.display(h) for h, _ in pairs]
    ref = [tokenizer.display(r) for _, r in pairs]
    return float(sacrebleu.corpus_chrf(hyp, [ref]).score)


def _hf_speed(model: BLTModel, prompts: list[Prompt], max_new_bytes: int) -> tuple[float | None, str | None]:
    """bytes/s of transformers' own greedy generation on the same weights (its forward re-run per byte)."""
    try:
        from transformers import BltForCausalLM
    except ImportError:
        return None, "transformers is not installed"
    from blt_decode.checkpoints import formats
    from blt_decode.decoding.sampling import NEVER_GENERATED

    with tempfile.TemporaryDirectory() as tmp:
        try:
            formats.save_checkpoint(model, Path(tmp) / "hf", "hf")
        except BLTDecodeError as exc:
            return None, f"model not exportable to the HF layout: {exc}"
        hf = BltForCausalLM.from_pretrained(Path(tmp) / "hf").eval()
    total, start = 0, time.perf_counter()
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([tokenizer.encode(p.prompt)])
            out = hf.generate(ids, max_new_tokens=max_new_bytes, min_new_tokens=max_new_bytes, do_sample=False,
                              use_cache=False, suppress_tokens=list(NEVER_GENERATED), eos_token_id=None,
                              pad_token_id=tokenizer.PAD_ID)
            total += out.shape[1] - ids.shape[1]
    return total / (time.perf_counter() - start), None


def _matching_prefix(output: bytes, reference: bytes) -> float:
    common = next((j for j, (a, b) in enumerate(zip(output, reference)) if a != b), min(len(output), len(reference)))
    return common / max(len(reference), 1)


def sum_passes(passes: Sequence[ForwardPasses]) -> ForwardPasses:
    """Forward passes of many generations added up, module by module."""
    return ForwardPasses(**{stack.attr: sum(p[stack] for p in passes) for stack in Stack})


def run_bench(model_spec: str | BLTModel, specs: Sequence[StrategySpec], backends: Sequence[str], prompts: Sequence[Prompt], *,
              max_new_bytes: int = 256, repeats: int = 3, threads: int = 1, compare_hf: bool = False,
              progress: bool = True, prompt_set: str = "custom", dtype: torch.dtype | None = None,
              device: str | None = None, batch_sizes: Sequence[int] = (), roofline: bool = False) -> BenchResult:
    """Run every strategy spec on every backend over ``prompts``; ratios are against the autoregressive
    row with the same sampling options on the same backend (greedy for greedy rows; rows are added where
    missing, see :func:`with_ar_references`). ``prompt_set`` labels the prompts in the result (a built-in
    set's version, or the user's file). ``roofline`` also measures :func:`matvec_roofline` in the model's
    dtype, first, in the same process. A backend with a ``warmup(model, rows=..., progress=...)`` method
    (the compiled ones) is warmed with it before the per-row warm-up generations, for every batch size."""
    specs = with_ar_references(specs)
    backends = list(dict.fromkeys(backends))
    for name in backends:
        plugins.get_backend(name)
    if repeats < 1:
        raise BLTDecodeError(f"repeats must be >= 1, got {repeats}")
    torch.set_num_threads(threads)
    model = api.load_model(model_spec, dtype=dtype, device=device)
    line = matvec_roofline(model.dtype, model.device) if roofline else None
    element = torch.tensor([], dtype=model.dtype).element_size()
    released = released_param_counts()
    warmup: dict[str, float] = {}
    rows: list[BenchRow] = []
    # (backend, sampling key) -> the reference AR row's label, passes, bandwidth, new bytes and outputs
    references: dict[tuple[str, SamplingKey], tuple[str, ForwardPasses, float, int, list[bytes]]] = {}
    for backend in backends:
        start = time.perf_counter()
        # compiled backends: every graph of the batch sizes measured, with progress
        plugins.warm_up(plugins.get_backend(backend), model, rows=tuple(sorted({*batch_sizes, 1})), progress=progress)
        for spec in specs:  # warm-up: compiles what is left on compiled backends, fills caches on eager
            api.generate(model, prompts[0].prompt, strategy=spec.strategy, backend=backend, max_new_bytes=16, seed=0, **spec.options)
        warmup[backend] = time.perf_counter() - start
    # the repeats go round the backends and rows (backend 1 row 1, row 2, ..., backend 2 row 1, ..., then
    # again), so that a slow spell of a noisy machine touches every row alike: the bytes/s ratios between
    # rows, and between backends, are then side by side
    walls: dict[tuple[str, int], list[float]] = {(b, i): [] for b in backends for i in range(len(specs))}
    runs: dict[tuple[str, int], tuple[list[bytes], list[DecodeStats]]] = {}
    bar = tqdm(total=repeats * len(backends) * len(specs), desc="bench", disable=not progress, leave=False)
    for _ in range(repeats):
        for backend in backends:
            for index, spec in enumerate(specs):
                outputs, stats, t0 = [], [], time.perf_counter()
                for p in prompts:
                    g = api.generate(model, p.prompt, strategy=spec.strategy, backend=backend,
                                     max_new_bytes=max_new_bytes, seed=0, **spec.options)
                    outputs.append(g.output)
                    stats.append(g.stats)
                walls[backend, index].append(time.perf_counter() - t0)
                runs[backend, index] = (outputs, stats)
                bar.update()
    bar.close()
    for backend in backends:
        for index, spec in enumerate(specs):
            outputs, stats = runs[backend, index]
            passes = sum_passes([s.passes for s in stats])
            gb = sum(s.bandwidth_gb for s in stats)
            key = (backend, sampling_key(spec.options))
            new_bytes = sum(s.new_bytes for s in stats)
            if key not in references and is_ar_reference(spec):  # with_ar_references put it first
                references[key] = (spec.label, passes, gb, new_bytes, outputs)
            reference, ar_passes, ar_gb, ar_new_bytes, reference_outputs = references[key]
            sampled = key[1] != GREEDY_KEY and spec.label != reference
            drafted = sum(s.drafted_bytes for s in stats)
            blocks = sum(s.blocks for s in stats)
            denoise = sum(s.denoise_passes for s in stats)
            bits = [continuation_bits(model, p.prompt, o) for p, o in zip(prompts, outputs)]
            ttfb = [s.time_to_first_byte_s for s in stats if s.time_to_first_byte_s is not None]
            decode_time = sum(s.wall_time_s - s.time_to_first_byte_s for s in stats if s.time_to_first_byte_s is not None)
            decode_bytes = sum(s.decode_bytes_per_second * (s.wall_time_s - s.time_to_first_byte_s)
                               for s in stats if s.decode_bytes_per_second is not None)
            wall = statistics.median(walls[backend, index])
            rows.append(BenchRow(
                label=spec.label, strategy=spec.strategy, options=spec.options, backend=backend, passes=passes,
                new_bytes=new_bytes, bandwidth_gb=gb, bandwidth_vs_ar=per_byte_ratio(gb, new_bytes, ar_gb, ar_new_bytes),
                projected_vs_ar={k: per_byte_ratio(bandwidth_gb(passes, pc), new_bytes, bandwidth_gb(ar_passes, pc), ar_new_bytes)
                                 for k, pc in released.items()},
                bytes_per_second=new_bytes / wall,
                time_to_first_byte_s=statistics.median(ttfb) if ttfb else None,
                decode_bytes_per_second=decode_bytes / decode_time if decode_time > 0 else None,
                wall_s=wall,
                acceptance_rate=sum(s.accepted_bytes for s in stats) / drafted if drafted else None,
                exact_match_vs_ar=None if sampled else sum(o == r for o, r in zip(outputs, reference_outputs)) / len(prompts),
                matching_prefix_vs_ar=None if sampled else statistics.mean(
                    _matching_prefix(o, r) for o, r in zip(outputs, reference_outputs)),
                chrf=_chrf(outputs, [p.reference for p in prompts]),
                bits_per_byte_under_ar=sum(b for b, _ in bits) / max(sum(n for _, n in bits), 1),
                denoise_passes_per_block=denoise / blocks if blocks else None,
                bytes_per_block=new_bytes / blocks if blocks else None,
                reference=reference,
                weight_gb_per_second=weight_gb(passes, model.param_counts(), element) / wall,
            ))
    hf_rate, hf_note = _hf_speed(model, list(prompts), max_new_bytes) if compare_hf else (None, None)
    throughput = run_throughput(model, specs, backends, prompts, batch_sizes, max_new_bytes=max_new_bytes,
                                progress=progress) if batch_sizes else []
    label = model_spec if isinstance(model_spec, str) else "(model object)"
    return BenchResult(label, prompt_set, len(prompts), max_new_bytes, repeats, threads, warmup, rows, hf_rate, hf_note,
                       throughput, line)


def per_byte_ratio(cost: float, new_bytes: int, ar_cost: float, ar_new_bytes: int) -> float | None:
    """Cost per committed byte relative to the AR reference's: rows that stop early (EOS, a stop sequence,
    different sampled text) are not made to look cheaper by writing less. None when either wrote nothing."""
    if not new_bytes or not ar_new_bytes or not ar_cost:
        return None
    return (cost / new_bytes) / (ar_cost / ar_new_bytes)


def run_throughput(model: BLTModel, specs: Sequence[StrategySpec], backends: Sequence[str], prompts: Sequence[Prompt],
                   batch_sizes: Sequence[int], *, max_new_bytes: int = 256, repeats: int = 1,
                   progress: bool = True) -> list[ThroughputRow]:
    """For every backend, strategy spec and batch size: decode every prompt with the batched engine
    (:func:`blt_decode.generate_many`) and time it; speed-ups are against the smallest batch size, and
    ``vs_first_backend`` against the first backend at the same batch size, all measured in the same run
    (the backends take turns at each setting). On a backend with a ``warmup`` (the compiled ones) each
    setting first runs once untimed, so that no compilation is timed."""
    from blt_decode.engine.core import Engine

    sizes = sorted(set(batch_sizes))
    measured: dict[tuple[str, str, int], tuple[float, list[bytes], Any]] = {}

    def run_once(backend: str, spec: StrategySpec, size: int) -> tuple[float, list[bytes], Any]:
        engine = Engine(model, backend=backend, max_batch=size)
        streams = [engine.submit(p.prompt, strategy=spec.strategy, max_new_bytes=max_new_bytes, seed=i, **spec.options)
                   for i, p in enumerate(prompts)]
        t0 = time.perf_counter()
        engine.run_until_idle()
        return time.perf_counter() - t0, [s.result().output for s in streams], engine.stats()

    bar = tqdm(total=len(specs) * len(sizes) * len(backends), desc="throughput", disable=not progress, leave=False)
    for spec in specs:
        for size in sizes:
            for backend in backends:
                bar.set_postfix_str(f"{spec.label} batch {size} on {backend}")
                if plugins.prepares(plugins.get_backend(backend)):
                    run_once(backend, spec, size)
                walls, outputs, stats = [], [], None
                for _ in range(repeats):
                    wall, outputs, stats = run_once(backend, spec, size)
                    walls.append(wall)
                measured[backend, spec.label, size] = (statistics.median(walls), outputs, stats)
                bar.update()
    bar.close()
    rows: list[ThroughputRow] = []
    for backend in backends:
        for spec in specs:
            _, base_outputs, _ = measured[backend, spec.label, sizes[0]]
            base_rate = None
            for size in sizes:
                wall, outputs, stats = measured[backend, spec.label, size]
                first_wall, first_outputs, _ = measured[backends[0], spec.label, size]
                new_bytes = sum(len(o) for o in outputs)
                rate = new_bytes / wall
                base_rate = base_rate or rate
                rows.append(ThroughputRow(
                    label=spec.label, strategy=spec.strategy, options=spec.options, backend=backend, batch_size=size,
                    requests=len(prompts), new_bytes=new_bytes, wall_s=wall, bytes_per_second=rate,
                    speedup=rate / base_rate, occupancy=stats.occupancy, rows_per_decoder_call=stats.rows_per_call["decoder"],
                    same_as_smallest_batch=sum(a == b for a, b in zip(outputs, base_outputs)) / len(prompts),
                    vs_first_backend=rate / (sum(len(o) for o in first_outputs) / first_wall),
                ))
    return rows


# -- output -----------------------------------------------------------------------------------------
def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


#: the compact table's columns (the full table, ``bench --full`` and the JSON, has every figure)
COMPACT_HEAD = ("| strategy | backend | encoder | global | decoder | vs AR | bytes/s | first byte ms | acceptance "
                "| exact = AR | chrF |")


def markdown(result: BenchResult, *, full: bool = False) -> str:
    """The result as Markdown: a compact table that fits a terminal (passes that decide the cost, the
    Eq. 8 ratio to AR, speed, acceptance, quality) and the notes; ``full``: every column."""
    if not full:
        lines = [COMPACT_HEAD, "|" + "---|" * (COMPACT_HEAD.count("|") - 1)]
        for r in result.rows:
            ttfb = None if r.time_to_first_byte_s is None else 1000 * r.time_to_first_byte_s
            lines.append(f"| {r.label} | {r.backend} | {r.passes.encoder} | {r.passes.global_} | {r.passes.decoder} "
                         f"| {_fmt(r.bandwidth_vs_ar, '.3f')} | {r.bytes_per_second:.1f} | {_fmt(ttfb, '.1f')} "
                         f"| {_fmt(r.acceptance_rate, '.3f')} | {_fmt(r.exact_match_vs_ar, '.2f')} | {_fmt(r.chrf, '.1f')} |")
        return "\n".join(lines) + "\n\n" + _notes(result) + "(--full shows every column: projections to BLT-1B/3B, " \
            "decode bytes/s, blocks, bits/byte, ...)\n" + _throughput(result)
    proj = list(result.rows[0].projected_vs_ar) if result.rows else []
    head = ("| strategy | backend | " + " | ".join(stack.value for stack in Stack) + " | Eq. 8 GB | vs AR | "
            + " | ".join(f"vs AR at {p}" for p in proj)
            + " | bytes/s | decode bytes/s | first byte ms | acceptance | bytes/block | denoise passes/block "
              "| exact = AR | prefix = AR | chrF | bits/byte under AR | weight GB/s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in result.rows:
        ttfb = None if r.time_to_first_byte_s is None else 1000 * r.time_to_first_byte_s
        lines.append(
            f"| {r.label} | {r.backend} | " + " | ".join(str(n) for _, n in r.passes.items()) + " | "
            f"{r.bandwidth_gb:.4g} | {_fmt(r.bandwidth_vs_ar, '.3f')} | " + " | ".join(_fmt(r.projected_vs_ar[p], '.3f') for p in proj)
            + f" | {r.bytes_per_second:.1f} | {_fmt(r.decode_bytes_per_second, '.1f')} | {_fmt(ttfb, '.1f')} "
              f"| {_fmt(r.acceptance_rate, '.3f')} | {_fmt(r.bytes_per_block, '.2f')} | {_fmt(r.denoise_passes_per_block, '.2f')} "
              f"| {_fmt(r.exact_match_vs_ar, '.2f')} | {_fmt(r.matching_prefix_vs_ar, '.2f')} | {_fmt(r.chrf, '.1f')} "
              f"| {r.bits_per_byte_under_ar:.3f} | {_fmt(r.weight_gb_per_second, '.3g')} |"
        )
    return "\n".join(lines) + "\n\n" + _notes(result) + _throughput(result)


def _throughput(result: BenchResult) -> str:
    return "\n" + throughput_markdown(result.throughput) if result.throughput else ""


def _notes(result: BenchResult) -> str:
    notes = [f"model {result.model}, prompt set {result.prompt_set} ({result.prompts} prompts), {result.max_new_bytes} new bytes, "
             f"median of {result.repeats} repeats, torch threads = {result.threads}; warm-up s: "
             + ", ".join(f"{k} {v:.1f}" for k, v in result.warmup_s.items())]
    if result.roofline is not None:
        line = result.roofline
        cache = f"> last-level cache {line.cache_mb:.0f} MiB" if line.cache_mb else "(cache size unknown)"
        notes.append(f"matrix-vector roofline: {line.gb_per_second:.2f} GB/s ({line.dtype}, {line.matrix_mb:.0f} MiB matrix {cache}); "
                     "weight GB/s as a share of it: " + ", ".join(
                         f"{r.label} {r.backend} {r.weight_gb_per_second / line.gb_per_second:.0%}" for r in result.rows
                         if r.weight_gb_per_second is not None))
    ratios = backend_ratios(result)
    if ratios:
        first = result.rows[0].backend
        by_backend: dict[str, list[str]] = {}
        for (label, backend), ratio in ratios.items():
            by_backend.setdefault(backend, []).append(f"{label} {ratio:.2f}")
        notes += [f"{backend} / {first} bytes/s (same run, repeats interleaved): " + ", ".join(parts)
                  for backend, parts in by_backend.items()]
    if any(r.reference != "ar" for r in result.rows):
        notes.append("sampled rows: vs AR = against " + ", ".join(sorted({r.reference for r in result.rows if r.reference != "ar"}))
                     + " (AR sampling with the same options); exact = AR is left out (same distribution, different draws)")
    if result.hf_bytes_per_second is not None:
        ours = next((r for r in result.rows if r.strategy == "autoregressive" and r.reference == "ar"
                     and r.label == "ar"), None)
        note = f"transformers greedy generate: {result.hf_bytes_per_second:.1f} bytes/s"
        if ours is not None:
            note += f"; blt-decode AR {ours.backend} / transformers = {ours.bytes_per_second / result.hf_bytes_per_second:.2f}"
        notes.append(note)
    elif result.hf_note:
        notes.append(f"transformers comparison not run: {result.hf_note}")
    return "\n".join(notes) + "\n"


def backend_ratios(result: BenchResult) -> dict[tuple[str, str], float]:
    """(label, backend) -> the row's bytes/s over the same label's on the first backend of the run, for
    every backend after the first."""
    first = result.rows[0].backend if result.rows else None
    base = {r.label: r.bytes_per_second for r in result.rows if r.backend == first}
    return {(r.label, r.backend): r.bytes_per_second / base[r.label] for r in result.rows
            if r.backend != first and base.get(r.label)}


def throughput_markdown(rows: Sequence[ThroughputRow]) -> str:
    """The batched-engine throughput rows as a Markdown table ("vs" columns: the smallest batch size, the
    first row's backend)."""
    first = rows[0].backend if rows else ""
    head = ("| strategy | backend | batch | requests | new bytes | wall s | bytes/s | vs smallest batch "
            f"| vs {first} | occupancy | rows / decoder call | same output |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r.label} | {r.backend} | {r.batch_size} | {r.requests} | {r.new_bytes} | {r.wall_s:.2f} "
                     f"| {r.bytes_per_second:.1f} | {r.speedup:.2f} | {r.vs_first_backend:.2f} | {r.occupancy:.2f} "
                     f"| {r.rows_per_decoder_call:.1f} | {r.same_as_smallest_batch:.2f} |")
    return "\n".join(lines) + "\n"


def require_matplotlib() -> None:
    """Fail with one clear line when matplotlib (the ``bench`` extra) is missing."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise BLTDecodeError(f"--plot needs matplotlib: {install_hint('bench')}")


def plot(result: BenchResult, path: str | Path) -> None:
    """Bandwidth ratio vs quality (chrF when references exist, else bits/byte under AR), the frontier drawn."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result.rows if r.backend == result.rows[0].backend and r.bandwidth_vs_ar is not None]
    use_chrf = all(r.chrf is not None for r in rows)
    quality = [r.chrf if use_chrf else -r.bits_per_byte_under_ar for r in rows]
    x = [r.bandwidth_vs_ar for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter(x, quality)
    for r, xi, yi in zip(rows, x, quality):
        ax.annotate(r.label, (xi, yi), fontsize=8, xytext=(4, 3), textcoords="offset points")
    frontier, best = [], -math.inf
    for xi, yi in sorted(zip(x, quality)):
        if yi > best:
            frontier.append((xi, yi))
            best = yi
    ax.plot(*zip(*frontier), linestyle="--", color="grey", label="frontier")
    ax.set_xlabel("Eq. 8 bandwidth / autoregressive (lower is cheaper)")
    ax.set_ylabel("chrF vs held-out text" if use_chrf else "− bits/byte under AR (higher is better)")
    ax.set_title(f"{result.model}: bandwidth vs quality ({rows[0].backend if rows else ''})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
