"""Render a traced generation: a self-contained HTML page or coloured terminal text.

Both read only the events of :mod:`blt_decode.trace` plus the entropy model's per-byte entropies, so
every strategy gets the same pictures: patch boundaries, an entropy strip, BLT-S drafts coloured by
accepted/rejected, diffusion unmasking order, and global-model passes.
"""

from __future__ import annotations

import html
from typing import Any, Sequence

import attrs
import torch

from blt_decode.api import Generation, generate, load_model
from blt_decode.model import tokenizer
from blt_decode.model.blt import BLTModel
from blt_decode.trace import GlobalPass, Unmasked, Verified


@attrs.frozen
class TracedGeneration:
    """A generation with its trace and what the renderers need beside it: the strategy and options, the whole
    sequence's ids, the entropies and the patching ``threshold`` (None for static patching)."""

    generation: Generation
    strategy: str
    options: dict[str, Any]
    #: token ids of the whole sequence (BOS, prompt, output)
    ids: tuple[int, ...]
    #: entropy-model entropy at each position (None for static patching)
    entropies: tuple[float, ...] | None
    threshold: float | None


def trace_generation(model: str | BLTModel, prompt: str | bytes, *, strategy: str = "autoregressive",
                     max_new_bytes: int = 128, **options: Any) -> TracedGeneration:
    """Generate with tracing on and collect what the renderers need."""
    model = load_model(model)
    g = generate(model, prompt, strategy=strategy, max_new_bytes=max_new_bytes, trace=True, **options)
    ids = tokenizer.encode(g.prompt + g.output)
    entropies = None
    if model.patcher.uses_entropy:
        with torch.no_grad():
            entropies = tuple(model.entropies(torch.tensor([ids], device=model.device))[0].tolist())
    return TracedGeneration(g, strategy, options, tuple(ids), entropies, model.patcher.threshold)


def _byte_label(token: int) -> str:
    if not tokenizer.is_byte(token):
        return tokenizer.SPECIAL_NAMES.get(token, f"<{token}>")
    b = token - tokenizer.OFFSET
    if b == 0x0A:
        return "↵"
    if b == 0x20:
        return "·"
    if 0x21 <= b < 0x7F:
        return chr(b)
    return f"\\x{b:02x}"


def _unmask_steps(events: Sequence[Any]) -> dict[int, int]:
    """Position -> the diffusion pass (1-based) that unmasked it, for the bytes that were committed."""
    steps: dict[int, int] = {}
    for e in events:
        if isinstance(e, Unmasked):
            for p in e.positions:
                steps[p] = e.step
    return steps


def _k_label(e: Verified) -> str:
    return f"k={e.k if e.k is not None else len(e.drafted) - 1}"


def _k_summary(events: Sequence[Any]) -> str:
    ks = [e.k if e.k is not None else len(e.drafted) - 1 for e in events if isinstance(e, Verified)]
    if not ks:
        return "-"
    ordered = sorted(ks)
    return f"min {ordered[0]}, median {ordered[len(ordered) // 2]}, max {ordered[-1]} over {len(ks)} rounds"


_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1100px}
h1{font-size:20px} h2{font-size:16px;margin-top:28px}
.summary td{padding:2px 12px 2px 0}
.text{font-family:ui-monospace,Menlo,monospace;font-size:15px;line-height:2.4;word-break:break-all}
.patch{border-left:2px solid #3a6ea5;padding-left:1px;margin-left:1px}
.patch.prompt{background:#f1f1f1}
.b{display:inline-block;min-width:.6em;text-align:center;position:relative}
.b sup{position:absolute;top:-1.1em;left:0;font-size:9px;color:#7a3db8}
.strip{display:flex;align-items:flex-end;height:60px;gap:1px;margin-top:6px}
.strip div{width:6px;background:#9bb7d4}
.strip div.hot{background:#d9534f}
.round{font-family:ui-monospace,Menlo,monospace;margin:2px 0}
.k{color:#777;font-size:12px}
.acc{background:#c8efc8} .rej{background:#f6c6c6;text-decoration:line-through}
.legend span{margin-right:14px}
"""


def to_html(t: TracedGeneration) -> str:
    """One self-contained HTML page (inline CSS, no scripts, no network assets)."""
    g, events = t.generation, t.generation.trace.events
    patches = g.trace.patches()
    starts = {p.start for p in patches} | ({patches[-1].end} if patches else set())
    prompt_end = 1 + len(g.prompt)
    steps = _unmask_steps(events)
    spans = []
    for pos, token in enumerate(t.ids):
        if pos in starts:
            if pos:
                spans.append("</span>")
            cls = "patch prompt" if pos < prompt_end else "patch"
            spans.append(f'<span class="{cls} patch-marker" title="patch starts at {pos}">')
        entropy = f"H={t.entropies[pos]:.3f}" if t.entropies else ""
        sup = f"<sup>{steps[pos]}</sup>" if pos in steps else ""
        spans.append(f'<span class="b" title="position {pos} {entropy}">{sup}{html.escape(_byte_label(token))}</span>')
    if t.ids:
        spans.append("</span>")

    strip = ""
    if t.entropies:
        top = max(t.entropies) or 1.0
        bars = "".join(
            f'<div class="{"hot" if t.threshold is not None and h > t.threshold else ""}" '
            f'style="height:{max(2, int(56 * h / top))}px" title="position {i}: H={h:.3f}"></div>'
            for i, h in enumerate(t.entropies)
        )
        strip = f'<h2>Entropy strip</h2><p>Red: H(t) &gt; θ = {t.threshold:.4f}, so byte t+1 starts a patch.</p><div class="strip">{bars}</div>'

    rounds = []
    for e in events:
        if isinstance(e, Verified):
            acc = "".join(html.escape(_byte_label(i)) for i in e.drafted[: e.accepted])
            rej = "".join(html.escape(_byte_label(i)) for i in e.drafted[e.accepted :])
            rounds.append(f'<div class="round draft">@{e.position} <span class="k">{_k_label(e)}</span>: '
                          f'<span class="acc">{acc}</span><span class="rej">{rej}</span></div>')
    drafts = (f"<h2>Drafts ({len(rounds)} verification passes)</h2><p>k = the draft length the round chose "
              f"(it changes per round with <code>k=auto</code> / <code>block_size=auto</code>).</p>{''.join(rounds)}"
              if rounds else "")

    blocks: dict[int, list[Unmasked]] = {}
    for e in events:
        if isinstance(e, Unmasked):
            blocks.setdefault(e.block_start, []).append(e)
    diffusion = ""
    if blocks:
        rows = []
        for start, passes in blocks.items():
            order = " → ".join(
                "{" + ", ".join(f"{p}:{html.escape(_byte_label(i))} ({c:.2f})" for p, i, c in zip(e.positions, e.ids, e.confidences)) + "}"
                for e in passes
            )
            rows.append(f'<div class="round unmask">block @{start}: {order}</div>')
        diffusion = f"<h2>Diffusion unmasking order ({len(blocks)} blocks)</h2><p>Superscripts in the text give the pass that unmasked each byte.</p>{''.join(rows)}"

    s = g.stats
    summary = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>" for k, v in [
        ("strategy", f"{t.strategy} {t.options or ''}"),
        ("new bytes", s.new_bytes), ("patches", s.patches),
        ("forward passes", f"patcher {s.passes.patcher}, encoder {s.passes.encoder}, global {s.passes.global_}, decoder {s.passes.decoder}"),
        ("global passes", len([e for e in events if isinstance(e, GlobalPass)])),
        ("acceptance", "-" if s.acceptance_rate is None else f"{s.acceptance_rate:.3f}"),
        ("draft length k per round", _k_summary(events)),
        ("bandwidth (Eq. 8)", f"{s.bandwidth_gb:.4g} GB"), ("stop", s.stop_reason),
    ])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>blt-decode trace</title><style>{_CSS}</style></head>
<body>
<h1>blt-decode trace: {html.escape(t.strategy)}</h1>
<table class="summary">{summary}</table>
<h2>Text and patches</h2>
<p class="legend"><span>│ patch boundary (grey: prompt)</span><span>· space</span><span>↵ newline</span></p>
<div class="text">{''.join(spans)}</div>
{strip}
{drafts}
{diffusion}
</body></html>
"""


_RESET, _GREEN, _RED, _DIM = "\x1b[0m", "\x1b[42;30m", "\x1b[41;30m", "\x1b[2m"
_PATCH_COLOURS = ("\x1b[48;5;153m", "\x1b[48;5;223m")


def to_terminal(t: TracedGeneration, *, colour: bool = True) -> str:
    """Text view: patches on alternating backgrounds (``colour``) or separated by ``|`` (without colour),
    then one line per BLT-S/BLT-DV round (accepted/rejected drafts) or diffusion pass."""
    g, events = t.generation, t.generation.trace.events
    reset, green, red, dim = (_RESET, _GREEN, _RED, _DIM) if colour else ("", "", "", "")
    patches = g.trace.patches()
    out = []
    shade = 0
    boundaries = {p.start for p in patches}
    for pos, token in enumerate(t.ids):
        label = _byte_label(token)
        if pos in boundaries:
            shade ^= 1
            if not colour and pos:
                out.append("|")
        out.append(f"{_PATCH_COLOURS[shade]}{label}{_RESET}" if colour else label)
    lines = ["".join(out)]
    for e in events:
        if isinstance(e, Verified):
            acc = "".join(_byte_label(i) for i in e.drafted[: e.accepted])
            rej = "".join(_byte_label(i) for i in e.drafted[e.accepted :])
            marks = "" if colour else f" (accepted {e.accepted} of {len(e.drafted)})"
            lines.append(f"{dim}@{e.position:<5} {_k_label(e):<5}{reset} {green}{acc}{reset}{red}{rej}{reset}{marks}")
        elif isinstance(e, Unmasked):
            shown = " ".join(f"{p}:{_byte_label(i)}" for p, i in zip(e.positions, e.ids))
            lines.append(f"{dim}block@{e.block_start} pass {e.step}{reset} {shown}")
    s = g.stats
    lines.append(f"{dim}{s.new_bytes} bytes, {s.patches} patches, passes: global {s.passes.global_}, decoder {s.passes.decoder}{reset}")
    return "\n".join(lines)
