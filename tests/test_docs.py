"""The tutorial's code blocks run as written: a third-party strategy package, registered through a real
entry point, used by name, and property-tested with blt_decode.testing."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from blt_decode import plugins

DOCS = Path(__file__).resolve().parents[1] / "docs"
BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.S)


def tutorial_blocks():
    return BLOCK.findall((DOCS / "tutorial.md").read_text())


def test_tutorial_has_the_pieces():
    kinds = [(lang, code.splitlines()[0]) for lang, code in tutorial_blocks()]
    assert ("python", "# file: blt_rep_penalty.py") in kinds
    assert ("python", "# file: test_rep_penalty.py") in kinds
    assert any(lang == "toml" for lang, _ in kinds)
    assert ("python", "# run") in kinds


@pytest.fixture
def tutorial_package(tmp_path, monkeypatch):
    files = {}
    for lang, code in tutorial_blocks():
        first = code.splitlines()[0]
        if lang == "python" and first.startswith("# file: "):
            name = first.removeprefix("# file: ").strip()
            (tmp_path / name).write_text(code)
            files[name] = code
        elif lang == "toml":
            entry = re.search(r"\[project.entry-points.blt_decode\]\n(\w+) = \"(\w+)\"", code)
            dist = tmp_path / "blt_rep_penalty-0.1.0.dist-info"
            dist.mkdir()
            (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: blt-rep-penalty\nVersion: 0.1.0\n")
            (dist / "entry_points.txt").write_text(f"[blt_decode]\n{entry.group(1)} = {entry.group(2)}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins.reset()
    yield tmp_path
    plugins.reset()
    sys.modules.pop("blt_rep_penalty", None)


def test_tutorial_runs(tutorial_package):
    for lang, code in tutorial_blocks():
        if lang == "python" and code.startswith("# run"):
            exec(compile(code, "tutorial.md", "exec"), {})
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_rep_penalty.py"],
        cwd=tutorial_package, capture_output=True, text=True,
        env={**__import__("os").environ, "PYTHONPATH": str(tutorial_package)},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "2 passed" in result.stdout
