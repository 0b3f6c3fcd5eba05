"""The tutorial (docs/tutorial.md) works as a user would follow it: its files are written out from the
page's code blocks, the package is installed with ``pip install -e`` into a fresh virtual environment,
and there the page's ``blt-decode`` commands run (``blt-decode strategies`` lists the strategy), its
``# run`` block runs, and the package's own tests pass.

The environment is offline: the new venv sees this test environment's packages (torch, blt-decode,
pytest, hypothesis, pip, setuptools) and pip installs with ``--no-deps --no-build-isolation``.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.S)
FILE = "# file: "
#: generous bounds for a shared, loaded machine; each step takes seconds
TIMEOUT_S = 240


def tutorial_blocks() -> list[tuple[str, str]]:
    """(language, code) of every fenced block of the tutorial."""
    return BLOCK.findall((DOCS / "tutorial.md").read_text(encoding="utf-8"))


def tutorial_files() -> dict[str, str]:
    """Path inside the package -> content, for every block whose first line is ``# file: PATH``."""
    files = {}
    for _, code in tutorial_blocks():
        first = code.splitlines()[0]
        if first.startswith(FILE):
            files[first.removeprefix(FILE).strip()] = code
    return files


def tutorial_commands() -> list[list[str]]:
    """The ``blt-decode ...`` lines of the tutorial's bash blocks, split as a shell would (comments dropped)."""
    return [shlex.split(line, comments=True) for lang, code in tutorial_blocks() if lang == "bash"
            for line in code.splitlines() if line.startswith("blt-decode ")]


def test_tutorial_has_the_pieces():
    files = tutorial_files()
    assert set(files) == {"blt_rep_penalty.py", "blt_lookup.py", "tests/test_rep_penalty.py", "tests/test_lookup.py",
                          "pyproject.toml"}
    pyproject = files["pyproject.toml"]
    for needle in ("[build-system]", "[project.entry-points.blt_decode]", "py-modules", '"pytest"', '"hypothesis"'):
        assert needle in pyproject, needle
    text = (DOCS / "tutorial.md").read_text(encoding="utf-8")
    assert 'pip install -e ".[test]"' in text  # the install step names the test extra
    assert sum(code.startswith("# run") for lang, code in tutorial_blocks() if lang == "python") == 1
    assert ["blt-decode", "strategies"] in tutorial_commands()


def test_tutorial_as_a_user_runs_it(tmp_path, user_venv):
    package = tmp_path / "blt-extras"
    for relative, code in tutorial_files().items():
        (package / relative).parent.mkdir(parents=True, exist_ok=True)
        (package / relative).write_text(code, encoding="utf-8")
    # the page's `pip install -e ".[test]"`, offline: the test extra is already in the environment
    user_venv.install(package)

    # from outside the package directory, so that the module is found only through the installation
    for command in tutorial_commands():
        output = user_venv.run(command, tmp_path)
        if command == ["blt-decode", "strategies"]:
            assert re.search(r"^rep-penalty\s+greedy decoding with a repetition penalty", output, re.M), output
            assert re.search(r"^lookup\s+exactly greedy", output, re.M), output

    (run_block,) = [code for lang, code in tutorial_blocks() if lang == "python" and code.startswith("# run")]
    (tmp_path / "run_example.py").write_text(run_block, encoding="utf-8")
    user_venv.run([str(user_venv.python), "run_example.py"], tmp_path)

    tests = user_venv.run([str(user_venv.python), "-m", "pytest", "-q", "-p", "no:cacheprovider"], package)
    assert re.search(r"\b5 passed\b", tests), tests[-3000:]


#: pages whose Python examples run as written (tiny random models; no files, no network)
EXAMPLE_PAGES = ("engine.md", "evaluation.md", "../README.md")


@pytest.mark.parametrize("page", EXAMPLE_PAGES)
def test_python_examples_in_docs_run(page, capsys):
    blocks = [code for lang, code in BLOCK.findall((DOCS / page).read_text()) if lang == "python"]
    assert blocks, f"{page} has no python example"
    namespace: dict = {}
    for code in blocks:  # blocks of a page build on each other, as a reader runs them
        exec(compile(code, page, "exec"), namespace)


def _shell_lines(code: str) -> list[str]:
    """A bash block's commands, backslash continuations joined, comments and blank lines dropped."""
    return [line for line in code.replace("\\\n", " ").splitlines() if line.strip() and not line.startswith("#")]


def test_serving_examples_run_against_a_server_the_test_starts():
    """docs/serving.md's client examples (Python with the openai client, curl) run as written, against the
    server the page starts (`blt-decode serve --model default`, here on a free port in a thread)."""
    import shutil

    from blt_decode.api import default_model_available
    from blt_decode.serving.app import ServerThread, build_app

    if not default_model_available():
        pytest.skip("the page's examples use the shipped default model")
    page = (DOCS / "serving.md").read_text(encoding="utf-8")
    blocks = BLOCK.findall(page)
    python = [code for lang, code in blocks if lang == "python"]
    curls = [line for lang, code in blocks if lang == "bash" for line in _shell_lines(code) if line.startswith("curl ")]
    assert python and len(curls) >= 3 and "http://127.0.0.1:8000" in page
    with ServerThread(build_app("default", model_name="default", max_batch=4)) as server:
        for code in python:
            exec(compile(code.replace("http://127.0.0.1:8000", server.url), "serving.md", "exec"), {})
        if shutil.which("curl") is None:
            pytest.skip("no curl here to run the page's curl examples")
        for line in curls:
            run = subprocess.run(["bash", "-o", "pipefail", "-c", line.replace("http://127.0.0.1:8000", server.url)],
                                 capture_output=True, text=True, timeout=TIMEOUT_S)
            assert run.returncode == 0 and run.stdout.strip() and '"error"' not in run.stdout, (line, run.stdout, run.stderr)
