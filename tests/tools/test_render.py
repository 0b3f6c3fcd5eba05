import re
import shutil
import subprocess
import sys
from pathlib import Path

import attrs
import pytest

from blt_decode.tools import render
from blt_decode.trace import PatchClosed, RolledBack, Unmasked, Verified


@pytest.fixture(scope="module")
def traced():
    return render.trace_generation("random:tiny:1", "def add(a, b):", strategy="blt-s", max_new_bytes=40, k=4)


def expected_markers(t):
    patches = t.generation.trace.patches()
    starts = {p.start for p in patches} | {patches[-1].end}
    return len([s for s in starts if s < len(t.ids)])


def test_html_shows_every_patch_and_draft(traced):
    page = render.to_html(traced)
    assert page.count("patch-marker") == expected_markers(traced)
    rounds = traced.generation.trace.of_type(Verified)
    assert page.count('class="round draft"') == len(rounds) == traced.generation.stats.verify_passes
    assert len(re.findall(r'<div class="(?:hot)?" style="height', page)) == len(traced.ids)  # entropy strip
    assert "http://" not in page and "https://" not in page and "<script" not in page  # self-contained


def test_html_shows_diffusion_order_from_unmask_events(traced):
    copied = attrs.evolve(traced.generation.trace, events=list(traced.generation.trace.events))
    fake = attrs.evolve(traced, generation=attrs.evolve(traced.generation, trace=copied))
    fake.generation.trace.events.extend([
        Unmasked(block_start=16, step=1, positions=(16, 18), ids=(101, 102), confidences=(0.9, 0.8)),
        Unmasked(block_start=16, step=2, positions=(17,), ids=(103,), confidences=(0.6,)),
    ])
    page = render.to_html(fake)
    assert "Diffusion unmasking order (1 blocks)" in page
    assert page.index("16:a (0.90)") < page.index("17:c (0.60)")
    assert "<sup>2</sup>" in page


def test_terminal_view(traced):
    text = render.to_terminal(traced)
    assert text.count("\x1b[42;30m") == len(traced.generation.trace.of_type(Verified))
    assert "patches" in text.splitlines()[-1]


def test_per_round_draft_length_is_shown():
    t = render.trace_generation("random:tiny:1", "def add(a, b):", strategy="blt-s", max_new_bytes=60, k="auto")
    ks = [e.k for e in t.generation.trace.of_type(Verified)]
    assert ks and all(1 <= k <= 64 for k in ks)
    page, text = render.to_html(t), render.to_terminal(t)
    assert page.count('<span class="k">k=') == len(ks) and "draft length k per round" in page
    assert [int(k) for k in re.findall(r"k=(\d+)", text)] == ks


def test_cli_trace_writes_html(tmp_path):
    out = tmp_path / "t.html"
    subprocess.run([sys.executable, "-m", "blt_decode.cli", "trace", "def add(a, b):", "--model", "random:tiny",
                    "--strategy", "blt-s", "--html", str(out), "--max-new-bytes", "24"], check=True, capture_output=True)
    assert out.read_text().count("patch-marker") > 3


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="needs a Chromium binary (Debian package 'chromium'); not installed in CI")
def test_page_loads_in_headless_chromium(traced, tmp_path):
    page = tmp_path / "trace.html"
    page.write_text(render.to_html(traced))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0"]
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count("patch-marker") == expected_markers(traced)  # the DOM Chromium built
    assert "Uncaught" not in dom.stderr and "CONSOLE(" not in dom.stderr  # no console errors
    shot = tmp_path / "trace.png"
    subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1200,900", page.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 5000
    keep = Path("/tmp/blt-trace-screenshot.png")
    keep.write_bytes(shot.read_bytes())  # for a person to look at


def test_patches_rolled_back_by_a_rejection_are_not_drawn(traced):
    """A verification chunk that closed a patch past the bytes it kept, then rolled back (RolledBack): the
    page and the terminal view draw the final patches only, not every patch that ever closed."""
    events = list(traced.generation.trace.events)
    # a patch of 3 bytes or more: before it closed, a rejected chunk closed two patches inside it
    long = next(p for p in traced.generation.trace.patches() if p.end - p.start >= 3)
    at = events.index(long)
    rolled = events[:at] + [PatchClosed(long.start, long.start + 1, None),
                            PatchClosed(long.start + 1, long.start + 2, None), RolledBack(long.start)] + events[at:]
    fake = attrs.evolve(traced, generation=attrs.evolve(traced.generation, trace=attrs.evolve(
        traced.generation.trace, events=rolled)))
    assert render.to_html(fake).count("patch-marker") == render.to_html(traced).count("patch-marker")
    assert render.to_terminal(fake, colour=False).splitlines()[0] == render.to_terminal(traced, colour=False).splitlines()[0]
