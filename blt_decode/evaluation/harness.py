"""A model for EleutherAI's lm-evaluation-harness (``lm-eval``), backed by blt-decode; importing this module
registers it as ``blt-decode``. Requests, ``model_args`` and statistics: docs/evaluation.md."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import attrs
import torch

from blt_decode.api import generate_many, load_model, score_many
from blt_decode.checks import MAX_SEED, describe_integer, is_int, show
from blt_decode.decoding import options as options_mod
from blt_decode.decoding.stats import DecodeStats, ForwardPasses
from blt_decode.engine.request import Request
from blt_decode.errors import InvalidRequestError, MissingExtraError
from blt_decode.evaluation import before_stop
from blt_decode.model import tokenizer
from blt_decode.model.blt import BLTModel
from blt_decode.plugins import registry as plugins
from blt_decode.tools.bench import sum_passes

try:
    import lm_eval.models  # noqa: F401 - lm-eval's own models first: it fills its registry only while empty
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as exc:  # one line naming the pip command, not a traceback
    raise MissingExtraError(f"the lm-eval model needs the 'eval' extra ({exc.name} is not installed): "
                            "pip install 'blt-decode[eval]'") from None

#: the name lm-eval knows the model by
NAME = "blt-decode"
#: generation keyword arguments of lm-eval tasks that generate_until understands
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@attrs.define
class HarnessStatistics:
    """What the model did over an evaluation: its generations' decoding statistics, summed, and scoring."""

    generations: int = 0
    new_bytes: int = 0
    passes: ForwardPasses = ForwardPasses()
    bandwidth_gb: float = 0.0
    drafted_bytes: int = 0
    accepted_bytes: int = 0
    #: wall time of the generate_many calls (the engine's time, all requests together)
    generate_wall_s: float = 0.0
    scored_texts: int = 0
    scored_bytes: int = 0

    def add_generations(self, stats: Sequence[DecodeStats], wall_s: float) -> None:
        self.generations += len(stats)
        self.new_bytes += sum(s.new_bytes for s in stats)
        self.passes = sum_passes([self.passes, *(s.passes for s in stats)])
        self.bandwidth_gb += sum(s.bandwidth_gb for s in stats)
        self.drafted_bytes += sum(s.drafted_bytes for s in stats)
        self.accepted_bytes += sum(s.accepted_bytes for s in stats)
        self.generate_wall_s += wall_s

    def to_dict(self) -> dict[str, Any]:
        d = attrs.asdict(self)
        d.update(
            acceptance_rate=self.accepted_bytes / self.drafted_bytes if self.drafted_bytes else None,
            bandwidth_gb_per_byte=self.bandwidth_gb / self.new_bytes if self.new_bytes else None,
            decoder_passes_per_byte=self.passes.decoder / self.new_bytes if self.new_bytes else None,
            bytes_per_second=self.new_bytes / self.generate_wall_s if self.generate_wall_s > 0 else None,
        )
        return d


@attrs.frozen
class ModelRun:
    """What one BLTDecodeLM decodes with, and its statistics (filled as it works)."""

    strategy: str
    options: dict[str, Any]
    backend: str
    stats: HarnessStatistics

    def to_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "options": dict(self.options), "backend": self.backend, **self.stats.to_dict()}


#: the runs of every BLTDecodeLM made in this process (small records, not the models), so that
#: ``blt-decode eval lm-eval`` can report them after lm-eval's command line, which keeps its model to itself
RUNS: list[ModelRun] = []


def _int_arg(name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit() and len(value) < 100:
        value = int(value)
    if not is_int(value) or value < low or (high is not None and value > high):
        raise InvalidRequestError(f"{name} must be {describe_integer(low, high)}, got {show(value)}")
    return value


@register_model(NAME)
class BLTDecodeLM(LM):
    """lm-eval's ``LM`` over a blt-decode model and strategy (see the module's docstring)."""

    def __init__(self, model: str | Path | BLTModel = "default", strategy: str = "autoregressive", backend: str = "eager",
                 batch_size: int | str = 16, dtype: str | None = None, device: str | None = None, seed: int = 0,
                 max_gen_toks: int = 256, max_batch_size: int | None = None, **strategy_options: Any):
        # max_batch_size: lm-eval passes it to every model (it bounds batch_size="auto", which this one refuses)
        super().__init__()
        if batch_size == "auto" or (isinstance(batch_size, str) and batch_size.startswith("auto")):
            raise InvalidRequestError("batch_size=auto is not supported by the blt-decode model; give a number")
        from blt_decode.engine.core import MAX_BATCH

        self.batch_size = _int_arg("batch_size", batch_size, 1, MAX_BATCH)  # the engine's bound
        self.seed = _int_arg("seed", seed, 0, MAX_SEED)
        self.max_gen_toks = _int_arg("max_gen_toks", max_gen_toks, 1)
        if dtype is not None and dtype not in _DTYPES:
            raise InvalidRequestError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        self.model = load_model(model, dtype=_DTYPES[dtype] if dtype else None, device=device)
        self.backend = plugins.get_backend(backend).name
        found = plugins.get_strategy(strategy)
        self.strategy = found.name
        # values from a model_args string arrive typed by lm-eval's guess ("8" -> 8): the strategy's
        # declared types decide instead, as for -o KEY=VALUE
        text = [f"{k}={v}" for k, v in strategy_options.items() if isinstance(v, (str, int, float, bool))]
        parsed = options_mod.parse_option_strings(found, text)
        parsed.update({k: v for k, v in strategy_options.items() if not isinstance(v, (str, int, float, bool))})
        options_mod.make_options(found, parsed)  # unknown or out-of-range options fail now
        self.options = parsed
        self.limit = self.model.config.max_seqlen - 1  # bytes per sequence after BOS
        self.stats = HarnessStatistics()
        self.run = ModelRun(self.strategy, dict(self.options), self.backend, self.stats)
        RUNS.append(self.run)

    # lm-eval builds a model from --model_args plus its own flags' values (batch_size, max_batch_size,
    # device; it always passes them, its defaults included, so a flag given cannot be told from its default)
    # as cls(**model_args, **flags): a key in both was "got multiple values for keyword argument". Here the
    # key written in --model_args wins, and the flag's value fills only what model_args leaves out.
    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "BLTDecodeLM":
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> "BLTDecodeLM":
        flags = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **flags)

    # -- likelihoods ----------------------------------------------------------------------------------
    def _score_pairs(self, pairs: Sequence[tuple[bytes, bytes]], disable_tqdm: bool) -> list[tuple[float, bool]]:
        """(log-likelihood, all greedy) of each continuation after its context (cut on the left to fit)."""
        texts, splits = [], []
        for context, continuation in pairs:
            if len(continuation) > self.limit:
                raise InvalidRequestError(f"a continuation of {len(continuation)} bytes does not fit the model "
                                          f"({self.limit} bytes after BOS)")
            room = self.limit - len(continuation)
            if len(context) > room:  # keep the context's end, as lm-eval's own models do
                context = context[len(context) - room:]
            texts.append(context + continuation)
            splits.append(len(context))
        nonempty = [i for i, t in enumerate(texts) if t]
        scores = score_many(self.model, [texts[i] for i in nonempty], batch_size=self.batch_size,
                            progress=not disable_tqdm)
        self.stats.scored_texts += len(nonempty)
        self.stats.scored_bytes += sum(len(texts[i]) for i in nonempty)
        out = [(0.0, True)] * len(texts)
        for i, s in zip(nonempty, scores):
            out[i] = (float(s.logprobs[splits[i]:].sum()), bool(s.greedy[splits[i]:].all()))
        return out

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [(tokenizer.to_bytes(r.args[0]), tokenizer.to_bytes(r.args[1])) for r in requests]
        results = self._score_pairs(pairs, disable_tqdm)
        for r, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", r.args, result)
        return results

    def rolling_windows(self, data: bytes) -> list[tuple[bytes, bytes]]:
        """(context, scored bytes) windows covering ``data``: the first scores up to ``limit`` bytes from
        the start, each later one the next ``limit`` bytes at most, with the bytes before them as context
        up to a full window (lm-eval's rolling windows with context_len=1)."""
        windows, position = [(b"", data[: self.limit])], min(self.limit, len(data))
        while position < len(data):
            end = min(position + self.limit, len(data))
            windows.append((data[max(0, end - self.limit):position], data[position:end]))
            position = end
        return windows

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        documents = [tokenizer.to_bytes(r.args[0]) for r in requests]
        windows = [self.rolling_windows(d) if d else [] for d in documents]
        flat = self._score_pairs([w for ws in windows for w in ws], disable_tqdm)
        results, at = [], 0
        for r, ws in zip(requests, windows):
            total = sum(logp for logp, _ in flat[at : at + len(ws)])
            at += len(ws)
            results.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, total)
        return results

    # -- generation -----------------------------------------------------------------------------------
    def _request(self, context: str, gen_kwargs: dict[str, Any]) -> Request:
        kwargs = dict(gen_kwargs)
        unknown = sorted(set(kwargs) - set(GEN_KWARGS))
        if unknown:
            raise InvalidRequestError(f"generation option(s) {', '.join(unknown)} are not supported by the blt-decode "
                                      f"model; it takes {', '.join(GEN_KWARGS)}")
        until = kwargs.get("until") or []
        stops = [until] if isinstance(until, str) else list(until)
        max_new = _int_arg("max_gen_toks", kwargs.get("max_gen_toks", self.max_gen_toks), 1)
        options = dict(self.options)
        temperature = float(kwargs.get("temperature", 0.0) or 0.0)
        if kwargs.get("do_sample", temperature > 0) and temperature > 0:
            options["temperature"] = temperature
            options.update({k: kwargs[k] for k in ("top_p", "top_k") if kwargs.get(k) is not None})
        elif kwargs.get("do_sample"):  # sampling asked for without a temperature: temperature 1, as transformers does
            options["temperature"] = 1.0
        data = tokenizer.to_bytes(context)
        room = max(self.limit - max_new, 0)
        return Request(data[len(data) - room:] if len(data) > room else data, strategy=self.strategy, options=options,
                       max_new_bytes=max_new, stop=[s for s in stops if s], seed=self.seed)

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        prepared = [self._request(*r.args) for r in requests]
        started = time.perf_counter()
        generations = generate_many(self.model, prepared, backend=self.backend, batch_size=self.batch_size,
                                    progress=not disable_tqdm)
        self.stats.add_generations([g.stats for g in generations], time.perf_counter() - started)
        texts = []
        for r, request, g in zip(requests, prepared, generations):
            text = tokenizer.display(before_stop(g.output, [tokenizer.to_bytes(s) for s in request.stop]))
            self.cache_hook.add_partial("generate_until", r.args, text)
            texts.append(text)
        return texts

    def statistics(self) -> dict[str, Any]:
        """The strategy, its options, the backend, and :class:`HarnessStatistics` of everything it did so far."""
        return self.run.to_dict()


def simple_evaluate(model: BLTDecodeLM, **kwargs: Any) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` with a :class:`BLTDecodeLM`; the results gain ``"blt_decode"``: the
    model's :meth:`~BLTDecodeLM.statistics` (decoding cost beside the task metrics)."""
    import lm_eval

    results = lm_eval.simple_evaluate(model=model, **kwargs)
    if results is not None:
        results["blt_decode"] = model.statistics()
    return results


def format_statistics(runs: Iterable[ModelRun]) -> str:
    """A line per model: what its generations cost (for the command line, after lm-eval's table)."""
    lines = []
    for run in runs:
        s = run.to_dict()
        options = ",".join(f"{k}={v}" for k, v in s["options"].items())
        rate = s["acceptance_rate"]
        lines.append(f"blt-decode {s['strategy']}{':' + options if options else ''} on {s['backend']}: "
                     f"{s['generations']} generations, {s['new_bytes']} new bytes, Eq. 8 {s['bandwidth_gb']:.4g} GB, "
                     f"forward passes {s['passes']}, "
                     f"acceptance {'-' if rate is None else f'{rate:.3f}'}; scored {s['scored_texts']} texts "
                     f"({s['scored_bytes']} bytes)")
    return "\n".join(lines)


def run_cli(arguments: Sequence[str]) -> int:
    """``blt-decode eval lm-eval ARGS...``: lm-eval's own command line, with this model registered
    (``--model blt-decode`` unless another is given; ``--device cpu`` unless given or a GPU is there, where
    lm-eval's default cuda:0 applies), then the decoding statistics of the blt-decode models it ran."""
    from lm_eval.__main__ import cli_evaluate

    forwarded = list(arguments)
    given = {a.split("=", 1)[0] for a in forwarded if a.startswith("--")}
    if "--model" not in given and not {"-h", "--help"} & set(forwarded):
        forwarded = ["--model", NAME, *forwarded]
    if "--device" not in given:
        forwarded += ["--device", "cuda:0" if torch.cuda.is_available() else "cpu"]
    saved, sys.argv = sys.argv, ["lm-eval", *forwarded]
    done = len(RUNS)
    try:
        cli_evaluate()
        status = 0
    except SystemExit as exc:  # lm-eval's argparse and its own exits
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    finally:
        sys.argv = saved
    if RUNS[done:]:
        print(format_statistics(RUNS[done:]))
    return status
