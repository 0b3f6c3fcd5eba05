"""A bounded load test of the server on loopback: ``blt-decode serve-loadtest`` or
``python -m blt_decode.serving.loadtest``.

See docs/serving.md ("Measured")."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import attrs

from blt_decode.errors import BLTDecodeError

DEFAULT_STRATEGIES = "ar,ar:temperature=0.8+top_p=0.95,blt-s:k=8,blt-d:block_size=8,blt-dv:block_size=8"


@attrs.frozen
class LoadRequest:
    """One request of a load test: its place in the run (``index``), prompt, strategy and options, seed (None
    unless it samples) and the most new bytes (``max_tokens``)."""

    index: int
    prompt: bytes
    strategy: str
    options: dict[str, Any]
    seed: int | None
    max_tokens: int

    def body(self, model: str) -> dict[str, Any]:
        """The OpenAI request: the prompt as text when it is UTF-8, else as byte values."""
        try:
            prompt: Any = self.prompt.decode("utf-8")
        except UnicodeDecodeError:
            prompt = list(self.prompt)
        body = {"model": model, "prompt": prompt, "max_tokens": self.max_tokens, "stream": True,
                "strategy": self.strategy, "strategy_options": self.options,
                "stream_options": {"include_usage": True}}
        if self.seed is not None:
            body["seed"] = self.seed
        return body


@attrs.define
class Outcome:
    """What the client saw of one streamed request: whether it ended cleanly (``ok``) or its error, the text
    and bytes received, the time to its first byte and its latency."""

    ok: bool = False
    error: str | None = None
    text: str = ""
    output: bytes = b""
    new_bytes: int = 0
    ttfb_s: float | None = None
    latency_s: float = 0.0


def make_requests(count: int, strategies: str, max_tokens: int) -> list[LoadRequest]:
    """``count`` requests over the stored held-out prompts, cycling through ``strategies`` (``bench``'s
    ``NAME[:key=value+...]`` list); a sampling request gets the seed 1000 + its index."""
    from blt_decode.tools import bench
    from blt_decode.tools import prompt_sets
    specs = bench.parse_strategies(strategies)
    prompts = prompt_sets.load("heldout", min(count, prompt_sets.STORED["heldout"]))
    out = []
    for i in range(count):
        spec = specs[i % len(specs)]
        sampling = bool(spec.options.get("temperature"))
        out.append(LoadRequest(i, prompts[i % len(prompts)].prompt, spec.strategy, dict(spec.options),
                               1000 + i if sampling else None, max_tokens))
    return out


def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile (0..1) by linear interpolation between the sorted values; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


async def _one(client: Any, url: str, request: LoadRequest, model: str, headers: dict[str, str]) -> Outcome:
    outcome = Outcome()
    start = time.perf_counter()
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=request.body(model), headers=headers) as resp:
            if resp.status_code != 200:
                outcome.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:200]}"
                return outcome
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    outcome.ok = outcome.error is None
                    break
                event = json.loads(data)
                if "error" in event:
                    outcome.error = event["error"]["message"]
                    continue
                for choice in event.get("choices", []):
                    if choice["text"] and outcome.ttfb_s is None:
                        outcome.ttfb_s = time.perf_counter() - start
                    outcome.text += choice["text"]
                if "blt_decode" in event:
                    extra = event["blt_decode"]["choices"][0]
                    outcome.output = bytes.fromhex(extra["output_bytes_hex"])
                    outcome.new_bytes = extra["stats"]["new_bytes"]
    except Exception as exc:  # noqa: BLE001 - every failure is an error of the run, counted and shown
        outcome.error = f"{type(exc).__name__}: {exc}"
    finally:
        outcome.latency_s = time.perf_counter() - start
    if outcome.error is not None:
        outcome.ok = False
    return outcome


async def _run_clients(url: str, requests: list[LoadRequest], model: str, concurrency: int, api_key: str | None,
                       timeout_s: float) -> tuple[list[Outcome], float]:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits) as client:
        await _one(client, url, attrs.evolve(requests[0], max_tokens=4), model, headers)  # warm-up, not timed
        queue: asyncio.Queue[LoadRequest] = asyncio.Queue()
        for r in requests:
            queue.put_nowait(r)
        outcomes: list[Outcome | None] = [None] * len(requests)

        async def worker() -> None:  # one client: its next request when the last one has ended
            while not queue.empty():
                r = queue.get_nowait()
                outcomes[r.index] = await _one(client, url, r, model, headers)

        start = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), timeout_s)
        wall = time.perf_counter() - start
    return [o or Outcome(error="not run") for o in outcomes], wall


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, timeout_s: float, process: subprocess.Popen | None = None) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"no healthy server at {url} within {timeout_s} s")


def baseline(model: Any, requests: list[LoadRequest]) -> tuple[list[bytes], float]:
    """Batch-1 :func:`blt_decode.generate` in a loop: each request's output, and the wall time."""
    import blt_decode as bd

    bd.generate(model, requests[0].prompt, max_new_bytes=4)  # warm-up, not timed
    start = time.perf_counter()
    outputs = [bd.generate(model, r.prompt, strategy=r.strategy, max_new_bytes=r.max_tokens, seed=r.seed,
                           **r.options).output for r in requests]
    return outputs, time.perf_counter() - start


def summarize(outcomes: list[Outcome], wall_s: float, expected: list[bytes] | None) -> dict[str, Any]:
    """One setup's figures: requests, errors, mismatches with the batch-1 outputs ``expected`` (None without
    them), throughput over ``wall_s``, and TTFB and latency percentiles of the requests that succeeded."""
    from blt_decode.model import tokenizer
    ok = [o for o in outcomes if o.ok]
    ttfb = [o.ttfb_s for o in ok if o.ttfb_s is not None]
    latency = [o.latency_s for o in ok]
    new_bytes = sum(o.new_bytes for o in ok)
    mismatches = None
    if expected is not None:
        mismatches = sum(not (o.ok and o.output == e and o.text == tokenizer.display(e)) for o, e in zip(outcomes, expected))
    errors = [o.error for o in outcomes if not o.ok]
    return {
        "requests": len(outcomes), "errors": len(errors), "first_errors": errors[:3], "mismatches": mismatches,
        "wall_s": wall_s, "requests_per_s": len(ok) / wall_s, "new_bytes": new_bytes,
        "new_bytes_per_s": new_bytes / wall_s,
        **{f"ttfb_p{q}_s": percentile(ttfb, q / 100) for q in (50, 95, 99)},
        **{f"latency_p{q}_s": percentile(latency, q / 100) for q in (50, 95, 99)},
    }


def _quantiles(summary: dict[str, Any], name: str) -> str:
    return "/".join("-" if summary[f"{name}_p{q}_s"] is None else f"{summary[f'{name}_p{q}_s']:.2f}" for q in (50, 95, 99))


def markdown(result: dict[str, Any]) -> str:
    """:func:`run`'s result as a Markdown table, a row per setup measured and the batch-1 baseline, then each
    setup's new bytes/s relative to the baseline."""
    rows = [("setup", "req", "conc.", "errors", "≠ direct API", "req/s", "new B/s", "TTFB p50/p95/p99 (s)",
             "latency p50/p95/p99 (s)")]
    for name in ("server", "ray_serve"):
        r = result.get(name)
        if r is None:
            continue
        rows.append((r["label"], str(r["requests"]), str(result["concurrency"]), str(r["errors"]),
                     "-" if r["mismatches"] is None else str(r["mismatches"]), f"{r['requests_per_s']:.2f}",
                     f"{r['new_bytes_per_s']:.0f}", _quantiles(r, "ttfb"), _quantiles(r, "latency")))
    b = result.get("baseline")
    if b is not None:
        rows.append(("batch-1 generate loop", str(result["requests"]), "1", "0", "-", f"{b['requests_per_s']:.2f}",
                     f"{b['new_bytes_per_s']:.0f}", "-", "-"))
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    lines.insert(1, "|" + "---|" * len(rows[0]))
    for name in ("server", "ray_serve"):
        if b is not None and result.get(name):
            lines.append(f"\n{result[name]['label']}: {result[name]['new_bytes_per_s'] / b['new_bytes_per_s']:.2f}x "
                         "the new bytes/s of batch-1 generate in a loop (same run)")
    return "\n".join(lines)


def _serve_subprocess(args: argparse.Namespace, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "blt_decode.cli", "serve", "--model", args.model, "--model-name", "loadtest",
           "--port", str(port), "--max-batch", str(args.max_batch), "--threads", str(args.threads or 0),
           "--log-level", "warning", "--backend", args.backend]
    return subprocess.Popen(cmd, env={**os.environ, "BLT_DECODE_API_KEY": ""})


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The load test ``args`` describe (:func:`add_arguments`): the batch-1 baseline unless ``--no-baseline``,
    the server in a subprocess unless ``--skip-server``, Ray Serve with ``--ray-replicas``; returns the figures
    as a JSON-ready dict."""
    import blt_decode as bd

    requests = make_requests(args.requests, args.strategies, args.max_tokens)
    result: dict[str, Any] = {"model": args.model, "requests": args.requests, "concurrency": args.concurrency,
                              "max_tokens": args.max_tokens, "strategies": args.strategies,
                              "max_batch": args.max_batch, "cpus": os.cpu_count(),
                              "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}
    expected = None
    if not args.no_baseline:
        model = bd.load_model(args.model)
        expected, wall = baseline(model, requests)
        total = sum(len(e) for e in expected)
        result["baseline"] = {"wall_s": wall, "new_bytes": total, "new_bytes_per_s": total / wall,
                              "requests_per_s": len(requests) / wall}
        print(f"baseline: {len(requests)} requests, {total} bytes in {wall:.1f} s", file=sys.stderr)

    def measure(url: str, label: str) -> dict[str, Any]:
        outcomes, wall = asyncio.run(_run_clients(url, requests, "loadtest", args.concurrency, None, args.timeout))
        summary = {"label": label, **summarize(outcomes, wall, expected)}
        print(f"{label}: {summary['requests']} requests in {wall:.1f} s, {summary['errors']} errors", file=sys.stderr)
        return summary

    if not args.skip_server:
        port = _free_port()
        process = _serve_subprocess(args, port)
        try:
            _wait_healthy(f"http://127.0.0.1:{port}", args.timeout, process)
            result["server"] = measure(f"http://127.0.0.1:{port}", f"blt-decode serve (max-batch {args.max_batch})")
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:  # never leave the server running
                process.kill()
                process.wait()
    if args.ray_replicas:
        result["ray_serve"] = _measure_ray(args, measure)
    result["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    return result


def _measure_ray(args: argparse.Namespace, measure: Any) -> dict[str, Any]:
    from blt_decode.serving import local_ray_environment, require

    local_ray_environment()  # a cluster of this machine, on loopback
    require("ray", "serve-loadtest --ray-replicas")
    import ray
    from ray import serve

    from blt_decode.serving import ray_serve

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        port = _free_port()
        ray_serve.run(args.model, port=port, replicas=args.ray_replicas, blocking=False, max_batch=args.max_batch,
                      model_name="loadtest", threads=args.threads, num_cpus=os.cpu_count() / args.ray_replicas,
                      backend=args.backend)
        _wait_healthy(f"http://127.0.0.1:{port}", args.timeout)
        return measure(f"http://127.0.0.1:{port}", f"Ray Serve, {args.ray_replicas} replicas (max-batch {args.max_batch} each)")
    finally:
        serve.shutdown()
        ray.shutdown()


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the load test's flags to ``parser``; ``--threads`` is the caller's to add."""
    # every count is checked by argparse: a bad one is one line before any server starts (--concurrency 0
    # used to wait forever for a connection from an empty pool, with the server child running)
    from blt_decode.checks import int_argument
    from blt_decode.engine.core import MAX_BATCH

    counts, sizes = int_argument(1), int_argument(0)

    parser.add_argument("--model", default="default", help="model spec served and compared (default: %(default)s)")
    parser.add_argument("--requests", type=counts, default=64, help="(default: %(default)s)")
    parser.add_argument("--concurrency", type=counts, default=16, help="concurrent streaming clients (default: %(default)s)")
    parser.add_argument("--max-tokens", type=sizes, default=128, help="new bytes per request (default: %(default)s)")
    parser.add_argument("--strategies", default=DEFAULT_STRATEGIES,
                        help="cycled over the requests; NAME[:key=value+key=value] (default: %(default)s)")
    parser.add_argument("--max-batch", type=int_argument(1, MAX_BATCH), default=16, help="the server's engine slots (default: %(default)s)")
    parser.add_argument("--backend", default="eager",
                        help="the server's compute backend; eager by default, like the batch-1 loop it is compared with "
                             "and checked against byte for byte (default: %(default)s)")
    parser.add_argument("--ray-replicas", type=sizes, default=0, metavar="N",
                        help="also measure Ray Serve with N replicas on a local Ray cluster (needs the ray extra)")
    parser.add_argument("--skip-server", action="store_true", help="measure only Ray Serve")
    parser.add_argument("--no-baseline", action="store_true", help="skip the batch-1 loop (and the output check)")
    parser.add_argument("--timeout", type=_seconds, default=600.0, help="bound on each phase, seconds (default: %(default)s)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")


def main(args: argparse.Namespace) -> int:
    """Run the load test, print its table (and write ``--json``); returns 1 if any request failed or differed
    from the batch-1 output, else 0. ``--skip-server`` without ``--ray-replicas`` raises BLTDecodeError."""
    import torch

    if args.skip_server and not args.ray_replicas:
        raise BLTDecodeError("--skip-server leaves nothing to measure without --ray-replicas N")
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    result = run(args)
    print(markdown(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    bad = [r for r in (result.get("server"), result.get("ray_serve")) if r and (r["errors"] or r["mismatches"])]
    return 1 if bad else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m blt_decode.serving.loadtest", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--threads", type=int, default=1, help="torch threads here and in the server (default: %(default)s)")
    try:
        sys.exit(main(parser.parse_args()))
    except BLTDecodeError as exc:  # one line and exit 2, as from `blt-decode serve-loadtest`
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        sys.exit(2)
