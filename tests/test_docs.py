"""The tutorial's code blocks run as written: a third-party strategy package, registered through a real
entry point, used by name, and property-tested with blt_decode.testing."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

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
def tutorial_package(tmp_path, installed_plugin):
    for lang, code in tutorial_blocks():
        first = code.splitlines()[0]
        if lang == "python" and first.startswith("# file: "):
            (tmp_path / first.removeprefix("# file: ").strip()).write_text(code)
        elif lang == "toml":
            name = re.search(r'^name = "([\w-]+)"', code, re.M).group(1)
            entry = re.search(r"\[project.entry-points.blt_decode\]\n(\w+) = \"(\w+)\"", code)
            installed_plugin(name, entry.group(1), entry.group(2))
    return tmp_path


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
