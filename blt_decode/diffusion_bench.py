"""The BLT-D / BLT-DV measurement of docs/diffusion.md: AR vs BLT-D-4/8/16 (confidence α=0.7 and entropy
γ=1.0) vs BLT-DV-4/8/16 on held-out standard-library prompts.

    python -m blt_decode.diffusion_bench --model default --prompts 20 --max-new-bytes 256 --out bench.json

For every configuration: decoder and global passes, the paper's Eq. 8 bandwidth and its reduction vs AR,
mean denoising passes per block, exact-match rate vs AR (whole continuations), the mean share of each
continuation that matches AR before the first difference, and the bits-per-byte of the continuation
under the same model's autoregressive distribution (a quality proxy: lower = more like what the model
itself finds likely).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from typing import Any, Sequence

import torch
from tqdm import tqdm

from blt_decode import api
from blt_decode.bench import continuation_bits
from blt_decode.corpus import HELDOUT_CODE, stdlib_dir

CONFIGS: list[tuple[str, str, dict[str, Any]]] = [
    ("AR", "autoregressive", {}),
    *[(f"BLT-D-{b} α=0.7", "blt-d", {"block_size": b, "rule": "confidence", "alpha": 0.7}) for b in (4, 8, 16)],
    *[(f"BLT-D-{b} γ=1.0", "blt-d", {"block_size": b, "rule": "entropy", "gamma": 1.0}) for b in (4, 8, 16)],
    *[(f"BLT-DV-{b} α=0.3", "blt-dv", {"block_size": b, "alpha": 0.3}) for b in (4, 8, 16)],
]


def heldout_prompts(count: int, max_bytes: int = 256) -> list[bytes]:
    """``count`` prompts from the held-out stdlib files: each ends with a ``def ...:`` line and holds up to
    ``max_bytes`` bytes before it; files are taken round-robin, definitions evenly spaced in each file."""
    per_file: list[list[bytes]] = []
    for rel in HELDOUT_CODE:
        data = (stdlib_dir() / rel).read_bytes()
        ends = [m.end() for m in re.finditer(rb"^[ \t]*def [^\n]*:\n", data, flags=re.M)]
        per_file.append([data[max(0, e - max_bytes) : e] for e in ends])
    prompts: list[bytes] = []
    round_ = 0
    while len(prompts) < count and any(per_file):
        for options in per_file:
            if len(prompts) == count:
                break
            if options:
                # evenly spaced definitions: the middle one first, then further ones in later rounds
                step = max(1, len(options) // 3)
                idx = (len(options) // 2 + round_ * step) % len(options)
                candidate = options.pop(idx)
                if candidate not in prompts:
                    prompts.append(candidate)
        round_ += 1
    if len(prompts) < count:
        raise RuntimeError(f"only {len(prompts)} prompts found in the held-out files")
    return prompts


def run(model_spec: str, prompts: Sequence[bytes], max_new_bytes: int, configs=CONFIGS) -> list[dict[str, Any]]:
    model = api.load_model(model_spec)
    rows: list[dict[str, Any]] = []
    reference: list[bytes] = []
    for label, strategy, options in configs:
        totals = dict(decoder=0, global_=0, encoder=0, patcher=0, blocks=0, denoise=0, bandwidth=0.0, bits=0.0,
                      scored=0, exact=0, prefix=0.0, new_bytes=0, wall=0.0, drafted=0, accepted=0)
        outputs = []
        for i, prompt in enumerate(tqdm(prompts, desc=label, leave=False)):
            started = time.perf_counter()
            g = api.generate(model, prompt, strategy=strategy, max_new_bytes=max_new_bytes, seed=0, **options)
            totals["wall"] += time.perf_counter() - started
            s = g.stats
            totals["decoder"] += s.passes.decoder
            totals["global_"] += s.passes.global_
            totals["encoder"] += s.passes.encoder
            totals["patcher"] += s.passes.patcher
            totals["blocks"] += s.blocks
            totals["denoise"] += s.denoise_passes
            totals["bandwidth"] += s.bandwidth_gb
            totals["new_bytes"] += s.new_bytes
            totals["drafted"] += s.drafted_bytes
            totals["accepted"] += s.accepted_bytes
            bits, n = continuation_bits(model, prompt, g.output)
            totals["bits"] += bits
            totals["scored"] += n
            outputs.append(g.output)
            if reference:
                ref = reference[i]
                totals["exact"] += int(g.output == ref)
                common = next((j for j, (a, b) in enumerate(zip(g.output, ref)) if a != b), min(len(g.output), len(ref)))
                totals["prefix"] += common / max(len(ref), 1)
        if not reference:
            reference = outputs
            totals["exact"], totals["prefix"] = len(prompts), float(len(prompts))
        rows.append({"label": label, "strategy": strategy, "options": options, "outputs": [o.decode("utf-8", "replace") for o in outputs],
                     **totals})
    ar = rows[0]
    for r in rows:
        r["bandwidth_reduction"] = 1.0 - r["bandwidth"] / ar["bandwidth"]
        r["exact_match_rate"] = r["exact"] / len(prompts)
        r["mean_matching_prefix"] = r["prefix"] / len(prompts)
        r["bits_per_byte"] = r["bits"] / r["scored"] if r["scored"] else float("nan")
        r["denoise_passes_per_block"] = r["denoise"] / r["blocks"] if r["blocks"] else None
        # bytes the strategy committed per block (BLT-DV: the exact first byte + the accepted draft)
        r["bytes_per_block"] = r["new_bytes"] / r["blocks"] if r["blocks"] else None
        r["acceptance_rate"] = r["accepted"] / r["drafted"] if r["drafted"] else None
    return rows


def markdown(rows: list[dict[str, Any]], prompts: int) -> str:
    head = ("| method | decoder passes | global passes | Eq. 8 GB | bandwidth vs AR | denoise passes / block | "
            "bytes / block | drafted bytes kept | exact match vs AR | matching prefix | bits/byte under AR | wall s |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    lines = []
    for r in rows:
        dpb = f"{r['denoise_passes_per_block']:.2f}" if r["denoise_passes_per_block"] is not None else "—"
        bpb = f"{r['bytes_per_block']:.2f}" if r["bytes_per_block"] is not None else "—"
        acc = f"{100 * r['acceptance_rate']:.0f}%" if r.get("acceptance_rate") is not None else "—"
        lines.append(
            f"| {r['label']} | {r['decoder']} | {r['global_']} | {r['bandwidth']:.3f} | {-100 * r['bandwidth_reduction']:+.1f}% | "
            f"{dpb} | {bpb} | {acc} | {r['exact']}/{prompts} | {100 * r['mean_matching_prefix']:.0f}% | {r['bits_per_byte']:.3f} | {r['wall']:.0f} |"
        )
    return head + "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--prompt-bytes", type=int, default=256)
    parser.add_argument("--max-new-bytes", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="write the rows (with outputs) as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = heldout_prompts(args.prompts, args.prompt_bytes)
    rows = run(args.model, prompts, args.max_new_bytes)
    table = markdown(rows, len(prompts))
    print(table)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"model": args.model, "prompts": [p.decode("utf-8", "replace") for p in prompts],
                       "max_new_bytes": args.max_new_bytes, "rows": rows, "table": table}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
