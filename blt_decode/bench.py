"""``blt-decode bench``: strategies × backends on one model over a versioned prompt set, side by side.

Every number comes from one run: forward passes per module, the paper's Eq. 8 bandwidth and its ratio
to autoregressive decoding on the same prompts (for a sampled row: autoregressive sampling with the same
temperature/top-k/top-p, see :func:`with_ar_references`), the same ratio projected onto BLT-1B and BLT-3B
parameter counts from the measured pass counts, bytes/s (after warm-up, median of repeats), acceptance,
exact match against AR greedy, chrF of the continuation against the held-out text (sacrebleu), and
bits-per-byte of the continuation under the model's own autoregressive distribution (a quality proxy).
"""

from __future__ import annotations

import math
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import attrs
import torch
from tqdm import tqdm

from blt_decode import api, plugins, tokenizer
from blt_decode.cli import parse_option_value
from blt_decode.config import BLTConfig, TransformerConfig, ffn_dim_for
from blt_decode.corpus import HELDOUT_CODE, HELDOUT_PLAYS, plays_dir, stdlib_dir
from blt_decode.errors import BLTDecodeError
from blt_decode.model import BLTModel, ParamCounts
from blt_decode.stats import ForwardPasses, bandwidth_gb

#: bump when the prompt selection below changes
PROMPT_SET_VERSION = "heldout-v1"


# -- workload ---------------------------------------------------------------------------------------
@attrs.frozen
class Prompt:
    source: str  #: "code:<file>" or "plays:<stem>"
    prompt: bytes
    reference: bytes  #: the held-out text that really follows the prompt


def _cuts(data: bytes, pattern: bytes) -> list[int]:
    return [m.end() for m in re.finditer(pattern, data, flags=re.M)]


def prompt_set(count: int = 8, *, prompt_bytes: int = 256, reference_bytes: int = 256) -> list[Prompt]:
    """``count`` prompts from the held-out split of :mod:`blt_decode.corpus`, alternating stdlib code
    (cut after a ``def ...:`` line) and Shakespeare (cut after a speaker's line), with the true
    continuation as reference. Deterministic; versioned by :data:`PROMPT_SET_VERSION`."""
    pools: list[list[Prompt]] = []
    for rel in HELDOUT_CODE:
        data = (stdlib_dir() / rel).read_bytes()
        cuts = _cuts(data, rb"^[ \t]*def [^\n]*:\n")
        pools.append([Prompt(f"code:{rel}", data[max(0, c - prompt_bytes):c], data[c:c + reference_bytes]) for c in cuts])
    for stem in HELDOUT_PLAYS:
        path = next(plays_dir().rglob(f"{stem}.md"), None)
        if path is None:
            continue
        data = path.read_bytes()
        cuts = [c for c in _cuts(data, rb"^[A-Z][A-Z ]+\.?\n") if c > prompt_bytes]
        pools.append([Prompt(f"plays:{stem}", data[c - prompt_bytes:c], data[c:c + reference_bytes]) for c in cuts[::25]])
    prompts: list[Prompt] = []
    code, plays = [p for p in pools if p and p[0].source.startswith("code")], [p for p in pools if p and p[0].source.startswith("plays")]
    order = [pool for pair in zip(code, plays) for pool in pair] + code[len(plays):] + plays[len(code):]
    depth = 0
    while len(prompts) < count and any(depth < len(p) for p in order):
        for pool in order:
            if depth < len(pool) and len(prompts) < count:
                prompts.append(pool[(len(pool) // 2 + depth) % len(pool)])
        depth += 1
    return prompts


def prompts_from_file(path: str | Path) -> list[Prompt]:
    """A user prompt file: prompts separated by lines holding only ``---``; no references (no chrF)."""
    text = Path(path).read_bytes()
    parts = [p.strip(b"\n") for p in re.split(rb"^---$", text, flags=re.M)]
    return [Prompt(f"file:{path}#{i}", p, b"") for i, p in enumerate(parts) if p]


# -- what runs --------------------------------------------------------------------------------------
@attrs.frozen
class StrategySpec:
    label: str
    strategy: str
    options: dict[str, Any]


def parse_strategies(text: str) -> list[StrategySpec]:
    """``ar,blt-s:k=4,blt-d:block_size=8+rule=entropy`` → specs (options joined with ``+``)."""
    specs = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, opts = item.partition(":")
        options = {}
        for pair in filter(None, opts.split("+")):
            key, sep, value = pair.partition("=")
            if not sep:
                raise BLTDecodeError(f"bad strategy option {pair!r} in {item!r}: expected key=value")
            options[key] = parse_option_value(value)
        strategy = plugins.get_strategy(name)  # unknown names fail here, listing the registered ones
        plugins.make_options(strategy, options)  # and bad options too, before any work
        specs.append(StrategySpec(item, strategy.name, options))
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


def _is_ar_reference(spec: StrategySpec) -> bool:
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
            given = next((s for s in specs if _is_ar_reference(s) and sampling_key(s.options) == key), None)
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
    label: str
    strategy: str
    options: dict[str, Any]
    backend: str
    passes: ForwardPasses
    new_bytes: int
    bandwidth_gb: float
    bandwidth_vs_ar: float
    projected_vs_ar: dict[str, float]
    bytes_per_second: float
    acceptance_rate: float | None
    #: share of outputs identical to the reference AR row's (None for sampled rows: a speculative sampler
    #: is distributed as AR sampling, but draws differently, so equality per seed means nothing)
    exact_match_vs_ar: float | None
    chrf: float | None
    bits_per_byte_under_ar: float
    denoise_passes_per_block: float | None
    #: label of the autoregressive row the "vs AR" ratios and exact matches compare with
    reference: str = "ar"


@attrs.frozen
class BenchResult:
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
    from blt_decode import formats
    from blt_decode.sampling import NEVER_GENERATED

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


def run_bench(model_spec: str, specs: Sequence[StrategySpec], backends: Sequence[str], prompts: Sequence[Prompt], *,
              max_new_bytes: int = 256, repeats: int = 3, threads: int = 1, compare_hf: bool = False,
              progress: bool = True) -> BenchResult:
    """Run every strategy spec on every backend over ``prompts``; ratios are against the autoregressive
    row with the same sampling options on the same backend (greedy for greedy rows; rows are added where
    missing, see :func:`with_ar_references`)."""
    specs = with_ar_references(specs)
    for name in backends:
        plugins.get_backend(name)
    torch.set_num_threads(threads)
    model = api.load_model(model_spec)
    released = released_param_counts()
    warmup: dict[str, float] = {}
    rows: list[BenchRow] = []
    # (backend, sampling key) -> the reference AR row's label, passes, bandwidth and outputs
    references: dict[tuple[str, SamplingKey], tuple[str, ForwardPasses, float, list[bytes]]] = {}
    for backend in backends:
        start = time.perf_counter()
        for spec in specs:  # warm-up: compiles every graph on compiled backends, fills caches on eager
            api.generate(model, prompts[0].prompt, strategy=spec.strategy, backend=backend, max_new_bytes=16, seed=0, **spec.options)
        warmup[backend] = time.perf_counter() - start
        for spec in specs:
            rates, outputs, stats = [], [], []
            for _ in tqdm(range(repeats), desc=f"{spec.label} on {backend}", disable=not progress, leave=False):
                outputs, stats, t0 = [], [], time.perf_counter()
                for p in prompts:
                    g = api.generate(model, p.prompt, strategy=spec.strategy, backend=backend,
                                     max_new_bytes=max_new_bytes, seed=0, **spec.options)
                    outputs.append(g.output)
                    stats.append(g.stats)
                rates.append(sum(s.new_bytes for s in stats) / (time.perf_counter() - t0))
            passes = ForwardPasses(*(sum(getattr(s.passes, f) for s in stats) for f in ("patcher", "encoder", "global_", "decoder")))
            gb = sum(s.bandwidth_gb for s in stats)
            key = (backend, sampling_key(spec.options))
            if key not in references and _is_ar_reference(spec):  # with_ar_references put it first
                references[key] = (spec.label, passes, gb, outputs)
            reference, ar_passes, ar_gb, reference_outputs = references[key]
            sampled = key[1] != GREEDY_KEY and spec.label != reference
            drafted = sum(s.drafted_bytes for s in stats)
            blocks = sum(s.blocks for s in stats)
            denoise = sum(s.denoise_passes for s in stats)
            bits = [continuation_bits(model, p.prompt, o) for p, o in zip(prompts, outputs)]
            rows.append(BenchRow(
                label=spec.label, strategy=spec.strategy, options=spec.options, backend=backend, passes=passes,
                new_bytes=sum(s.new_bytes for s in stats), bandwidth_gb=gb, bandwidth_vs_ar=gb / ar_gb,
                projected_vs_ar={k: bandwidth_gb(passes, pc) / bandwidth_gb(ar_passes, pc) for k, pc in released.items()},
                bytes_per_second=statistics.median(rates),
                acceptance_rate=sum(s.accepted_bytes for s in stats) / drafted if drafted else None,
                exact_match_vs_ar=None if sampled else sum(o == r for o, r in zip(outputs, reference_outputs)) / len(prompts),
                chrf=_chrf(outputs, [p.reference for p in prompts]),
                bits_per_byte_under_ar=sum(b for b, _ in bits) / max(sum(n for _, n in bits), 1),
                denoise_passes_per_block=denoise / blocks if blocks else None,
                reference=reference,
            ))
    hf_rate, hf_note = _hf_speed(model, list(prompts), max_new_bytes) if compare_hf else (None, None)
    return BenchResult(str(model_spec), PROMPT_SET_VERSION, len(prompts), max_new_bytes, repeats, threads, warmup,
                       rows, hf_rate, hf_note)


# -- output -----------------------------------------------------------------------------------------
def markdown(result: BenchResult) -> str:
    proj = list(result.rows[0].projected_vs_ar) if result.rows else []
    head = ("| strategy | backend | patcher | encoder | global | decoder | Eq. 8 GB | vs AR | "
            + " | ".join(f"vs AR at {p}" for p in proj)
            + " | bytes/s | acceptance | exact = AR | chrF | bits/byte under AR |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in result.rows:
        acc = f"{r.acceptance_rate:.3f}" if r.acceptance_rate is not None else "-"
        chrf = f"{r.chrf:.1f}" if r.chrf is not None else "-"
        exact = f"{r.exact_match_vs_ar:.2f}" if r.exact_match_vs_ar is not None else "-"
        lines.append(
            f"| {r.label} | {r.backend} | {r.passes.patcher} | {r.passes.encoder} | {r.passes.global_} | {r.passes.decoder} | "
            f"{r.bandwidth_gb:.4g} | {r.bandwidth_vs_ar:.3f} | " + " | ".join(f"{r.projected_vs_ar[p]:.3f}" for p in proj)
            + f" | {r.bytes_per_second:.1f} | {acc} | {exact} | {chrf} | {r.bits_per_byte_under_ar:.3f} |"
        )
    notes = [f"model {result.model}, prompt set {result.prompt_set} ({result.prompts} prompts), {result.max_new_bytes} new bytes, "
             f"median of {result.repeats} repeats, torch threads = {result.threads}; warm-up s: "
             + ", ".join(f"{k} {v:.1f}" for k, v in result.warmup_s.items())]
    if any(r.reference != "ar" for r in result.rows):
        notes.append("sampled rows: vs AR = against " + ", ".join(sorted({r.reference for r in result.rows if r.reference != "ar"}))
                     + " (AR sampling with the same options); exact = AR is left out (same distribution, different draws)")
    if result.hf_bytes_per_second is not None:
        ours = next(r.bytes_per_second for r in result.rows if r.strategy == "autoregressive" and r.backend == "eager")
        notes.append(f"transformers greedy generate: {result.hf_bytes_per_second:.1f} bytes/s; blt-decode AR eager / transformers = {ours / result.hf_bytes_per_second:.2f}")
    elif result.hf_note:
        notes.append(f"transformers comparison not run: {result.hf_note}")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def plot(result: BenchResult, path: str | Path) -> None:
    """Bandwidth ratio vs quality (chrF when references exist, else bits/byte under AR), the frontier drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BLTDecodeError("--plot needs matplotlib: pip install 'blt-decode[bench]'") from None
    rows = [r for r in result.rows if r.backend == result.rows[0].backend]
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
