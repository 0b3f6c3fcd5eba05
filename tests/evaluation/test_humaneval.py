"""HumanEval through the real engine and the real sandbox, on tiny random models and 2-3 problems."""

from __future__ import annotations

import json
import math
import pytest
import torch

import blt_decode as bd
from blt_decode.cli import main
from blt_decode.evaluation import before_stop
from blt_decode.evaluation import humaneval as he
from blt_decode.evaluation import sandbox
from blt_decode.evaluation.sandbox import SandboxConfig, run_program
from blt_decode.tools import bench
from blt_decode.tools import prompt_sets

STOPS = tuple(s.encode() for s in he.STOP_SEQUENCES)
MISSING = frozenset(sandbox.missing_layers())


@pytest.fixture(autouse=True)
def _accept_missing_sandbox_layers(monkeypatch):
    """On a machine without a kernel sandbox layer (docs/evaluation.md), programs are refused unless the
    caller names it: these tests then name it, as --unsafe-sandbox would (tests/evaluation/test_sandbox.py checks the
    refusal). A no-op where every layer is present."""
    if not MISSING:
        return
    accepting = SandboxConfig(unsafe_without=MISSING)
    monkeypatch.setattr(SandboxConfig.__init__, "__defaults__", (*SandboxConfig.__init__.__defaults__[:-1], MISSING))
    monkeypatch.setitem(he.run_humaneval.__kwdefaults__, "sandbox_config", accepting)
    monkeypatch.setattr(sandbox, "unsafe_layers", lambda text: MISSING if text is None else frozenset(text.split(",")))


@pytest.mark.parametrize("n,c,k,expected", [
    (5, 2, 1, 0.4), (5, 2, 2, 0.7), (5, 2, 3, 0.9), (5, 2, 4, 1.0), (10, 0, 1, 0.0), (10, 10, 10, 1.0),
    (1, 1, 1, 1.0), (1, 0, 1, 0.0), (200, 13, 100, 1 - math.comb(187, 100) / math.comb(200, 100)),
])
def test_pass_at_k_is_the_unbiased_estimator(n, c, k, expected):
    # hand-computed: 1 - C(n-c, k) / C(n, k); e.g. n=5, c=2, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert he.pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("n,c,k", [(5, 6, 1), (5, 2, 0), (5, 2, 6), (0, 0, 1)])
def test_pass_at_k_refuses_impossible_counts(n, c, k):
    with pytest.raises(he.HumanEvalError, match="pass@k needs"):
        he.pass_at_k(n, c, k)


def test_a_completion_ends_where_the_first_stop_sequence_begins():
    assert before_stop(b"    return x\n\ndef g():\n    pass\nif 1:", STOPS) == b"    return x\n"
    assert before_stop(b"    return x\n", STOPS) == b"    return x\n"
    assert before_stop(b"\nprint(1)", STOPS) == b""


@pytest.fixture(scope="module")
def problems():
    return prompt_sets.humaneval_problems()[:3]


def test_the_sandbox_runs_the_problems_tests(problems):
    """A known-correct completion passes, a wrong one fails: the tests really run."""
    for p in problems:
        assert run_program(he.program(p, p["canonical_solution"].encode()), SandboxConfig()).passed, p["task_id"]
        wrong = run_program(he.program(p, b"    return None\n"), SandboxConfig())
        assert wrong.status == "failed" and "AssertionError" in wrong.stderr, p["task_id"]


@pytest.fixture(scope="module")
def model():
    return bd.random_model("tiny", 3, dtype=torch.float64)


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_decodes_batched_as_alone_records_everything_and_resumes(tmp_path, model, problems, monkeypatch):
    out = tmp_path / "he.jsonl"
    specs = bench.parse_strategies("ar,blt-s:k=4")
    result = he.run_humaneval(model, specs, out, limit=2, max_new_bytes=24, progress=False)
    assert [r.label for r in result.rows] == ["ar", "blt-s:k=4"]
    ar = result.rows[0]
    assert ar.problems == 2 and ar.samples == 1 and ar.pass_at == {1: 0.0} and ar.statuses == {"failed": 2}
    assert ar.bandwidth_vs_ar == pytest.approx(1.0) and ar.passes.decoder > 0 and ar.bytes_per_second > 0
    records = _records(out)
    kinds = [r["kind"] for r in records]
    assert kinds.count("run") == 1 and kinds.count("completion") == 4 and kinds.count("result") == 4
    assert kinds.count("timing") == 2
    for r in (r for r in records if r["kind"] == "completion"):  # the engine's output is generate's, alone
        spec = next(s for s in specs if s.label == r["strategy"])
        alone = bd.generate(model, problems[int(r["task_id"].split("/")[1])]["prompt"], strategy=spec.strategy,
                            max_new_bytes=24, stop=list(STOPS), seed=0, **spec.options)
        assert bytes.fromhex(r["output_bytes_hex"]) == alone.output
        assert r["completion"] == before_stop(alone.output, STOPS).decode("utf-8", "replace")

    # resume: a finished run does nothing again (no engine is even built)
    import blt_decode.engine.core

    def no_engine(*a, **k):
        raise AssertionError("a finished run decoded again")

    monkeypatch.setattr(blt_decode.engine.core, "Engine", no_engine)
    again = he.run_humaneval(model, specs, out, limit=2, max_new_bytes=24, progress=False)
    assert len(_records(out)) == len(records) and again.rows[0].pass_at == ar.pass_at
    monkeypatch.undo()

    # an interrupted run (here: the last problem's lines lost, a torn line at the end) redoes only that
    lost = [r for r in records if r.get("task_id") == "HumanEval/1" and r["strategy"] == "blt-s:k=4"]
    kept = [r for r in records if r not in lost]
    out.write_text("".join(json.dumps(r) + "\n" for r in kept) + '{"kind": "compl')
    he.run_humaneval(model, specs, out, limit=2, max_new_bytes=24, progress=False)
    redone = _records(out)[len(kept):]
    assert sorted(r["kind"] for r in redone) == ["completion", "result", "timing"]
    assert all(r.get("task_id", "HumanEval/1") == "HumanEval/1" for r in redone)

    # a larger limit extends the file with the new problems only
    before = len(_records(out))
    wider = he.run_humaneval(model, specs, out, limit=3, max_new_bytes=24, progress=False)
    added = _records(out)[before:]
    assert {r["task_id"] for r in added if "task_id" in r} == {"HumanEval/2"} and wider.rows[0].problems == 3


def test_known_correct_completions_pass_through_the_runner(tmp_path, model, problems):
    """The runner judges what the file holds: completions replaced by the canonical solutions pass."""
    out = tmp_path / "he.jsonl"
    specs = bench.parse_strategies("ar")
    he.run_humaneval(model, specs, out, limit=2, max_new_bytes=16, progress=False)
    records = [r for r in _records(out) if r["kind"] != "result"]
    for r in records:
        if r["kind"] == "completion":
            r["output_bytes_hex"] = problems[int(r["task_id"].split("/")[1])]["canonical_solution"].encode().hex()
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = he.run_humaneval(model, specs, out, limit=2, max_new_bytes=16, progress=False)
    assert result.rows[0].pass_at == {1: 1.0} and result.rows[0].statuses == {"passed": 2}


def test_sampling_strategies_get_samples_and_pass_at_k(tmp_path, model):
    specs = bench.parse_strategies("ar:temperature=1.0,blt-d:block_size=4")
    result = he.run_humaneval(model, specs, tmp_path / "he.jsonl", limit=2, samples=3, max_new_bytes=8, progress=False)
    rows = {r.label: r for r in result.rows}
    assert set(rows) == {"ar", "ar:temperature=1.0", "blt-d:block_size=4"}
    assert rows["ar:temperature=1.0"].samples == 3 and set(rows["ar:temperature=1.0"].pass_at) == {1}
    assert rows["blt-d:block_size=4"].samples == 1 and rows["ar"].samples == 1  # greedy: decoded once
    assert rows["ar:temperature=1.0"].reference == "ar:temperature=1.0" and rows["blt-d:block_size=4"].reference == "ar"


def test_a_file_of_another_run_is_refused(tmp_path, model):
    out = tmp_path / "he.jsonl"
    he.run_humaneval(model, bench.parse_strategies("ar"), out, limit=1, max_new_bytes=8, progress=False)
    with pytest.raises(he.HumanEvalError, match="max_new_bytes: 8 there, 9 now"):
        he.run_humaneval(model, bench.parse_strategies("ar"), out, limit=1, max_new_bytes=9, progress=False)


def test_the_command_prints_the_table_and_writes_json_and_a_plot(tmp_path, capsys):
    rc = main(["eval", "humaneval", "--model", "random:tiny", "--limit", "2", "--max-new-bytes", "8",
               "--strategies", "ar,blt-d:block_size=4", "--output", str(tmp_path / "he.jsonl"),
               "--json", str(tmp_path / "he.json"), "--plot", str(tmp_path / "he.png")])
    out, err = capsys.readouterr()
    assert rc == 0, err[-2000:]
    assert "| blt-d:block_size=4 | 1 | 0.000 |" in out and "programs run in:" in err
    rows = json.loads((tmp_path / "he.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["ar", "blt-d:block_size=4"] and rows[1]["decoder_passes_per_completion"] > 0
    assert (tmp_path / "he.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args,words", [
    (["--samples", "2", "--strategies", "ar"], "needs a sampling strategy"),
    (["--limit", "0"], "--limit: expected an integer in 1..164"),
    (["--batch-size", "5000"], "--batch-size: expected an integer in 1..4096"),
    (["--timeout", "-1"], "--timeout: expected a number of seconds > 0"),
    (["--strategies", "blt-s:k=0"], "option 'k'"),
])
def test_command_errors_are_one_line(tmp_path, capsys, args, words):
    try:
        rc = main(["eval", "humaneval", "--model", "random:tiny", "--output", str(tmp_path / "he.jsonl"), *args])
    except SystemExit as exc:  # argparse's usage errors
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2 and words in err and len(err.strip().splitlines()) <= 2, err
    assert not (tmp_path / "he.jsonl").exists()


def test_the_documented_command_runs(tmp_path, capsys):
    """docs/evaluation.md's HumanEval command, at tiny scale (a random model, 2 problems, 8 bytes)."""
    import re
    import shlex
    from pathlib import Path

    page = (Path(__file__).resolve().parents[2] / "docs" / "evaluation.md").read_text()
    command = next(c for c in re.findall(r"```bash\n(.*?)```", page, re.S) if "blt-decode eval humaneval" in c)
    argv = shlex.split(command.split("\n\n")[0].replace("\\\n", " "))[1:]
    for flag, value in (("--model", "random:tiny"), ("--limit", "2"), ("--max-new-bytes", "8"),
                        ("--output", str(tmp_path / "he.jsonl")), ("--json", str(tmp_path / "he.json")),
                        ("--plot", str(tmp_path / "he.png"))):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    assert main(argv) == 0, capsys.readouterr().err[-2000:]
    rows = json.loads((tmp_path / "he.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["ar", "blt-s:k=8", "blt-d:block_size=8", "blt-dv:block_size=8"]


# -- the results file: malformed records, special files, one writer (issue 33) -------------------------------
HE_ARGS = ["eval", "humaneval", "--model", "random:tiny", "--limit", "1", "--max-new-bytes", "8", "--strategies", "ar"]


def _run_cli(*args):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "blt_decode.cli", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


@pytest.fixture(scope="module")
def finished_file(tmp_path_factory):
    """A finished results file of exactly the run HE_ARGS asks for (so resuming it reads every line)."""
    out = tmp_path_factory.mktemp("he") / "he.jsonl"
    he.run_humaneval("random:tiny", bench.parse_strategies("ar"), out, limit=1, max_new_bytes=8, progress=False)
    return out


def _without_results(records):
    return [r for r in records if r["kind"] != "result"]  # so that the completion is judged (read) again


def _set(kind, field, value, drop_results=False):
    def change(records):
        for r in records:
            if r["kind"] == kind:
                if value is KeyError:
                    del r[field]
                else:
                    r[field] = value
        return _without_results(records) if drop_results else records
    return change


def _set_passes(records):
    for r in records:
        if r["kind"] == "completion":
            del r["stats"]["passes"]["decoder"]
    return records


@pytest.mark.parametrize("change,words", [
    (_set("completion", "output_bytes_hex", KeyError, drop_results=True), "'completion' record has no 'output_bytes_hex'"),
    (_set("completion", "output_bytes_hex", "zz", drop_results=True), "'output_bytes_hex' must be a string of hex digits"),
    (_set("result", "passed", "yes"), "'passed' must be true or false, got 'yes'"),
    (_set("result", "sample", "0"), "'sample' must be an integer >= 0"),
    (_set("timing", "wall_s", "slow"), "'wall_s' must be a number"),
    (_set("run", "max_new_bytes", [8]), "'max_new_bytes' must be an integer >= 1"),
    (_set_passes, "stats 'passes' must be an object of integers"),
], ids=["missing hex", "bad hex", "passed a string", "sample a string", "wall_s a string", "run field a list",
        "passes incomplete"])
def test_a_results_file_with_malformed_records_is_one_line(finished_file, tmp_path, change, words):
    """Lines that are JSON but not records of their kind were a KeyError, a TypeError or a ValueError
    halfway through the run; now the file is refused up front, naming the line and the field."""
    records = change(_records(finished_file))
    out = tmp_path / "he.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    before = out.read_bytes()
    run = _run_cli(*HE_ARGS, "--output", str(out))
    err = run.stderr.strip().splitlines()
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert err[-1].startswith("blt-decode: error:") and "he.jsonl:" in err[-1] and words in err[-1], err[-1]
    assert not any(line.startswith("blt-decode: error:") for line in err[:-1])
    assert out.read_bytes() == before  # refused untouched


def test_the_unchanged_file_resumes_as_finished(finished_file, tmp_path):
    out = tmp_path / "he.jsonl"
    out.write_bytes(finished_file.read_bytes())
    run = _run_cli(*HE_ARGS, "--output", str(out))
    assert run.returncode == 0 and "| ar | 1 |" in run.stdout, run.stderr[-3000:]
    assert out.read_bytes() == finished_file.read_bytes()


def test_a_results_file_that_is_a_pipe_is_refused(tmp_path):
    import os

    fifo = tmp_path / "he.jsonl"
    os.mkfifo(fifo)
    run = _run_cli(*HE_ARGS, "--output", str(fifo))
    assert run.returncode == 2 and "a pipe, not a regular file" in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_a_second_run_on_one_results_file_is_refused(tmp_path, model):
    """A second evaluation writing the same file would decode and judge everything again, twice."""
    import subprocess
    import sys

    from blt_decode.tools import jobs
    out = tmp_path / "he.jsonl"
    holder = subprocess.Popen([sys.executable, "-c", "import sys\nfrom blt_decode.tools import jobs\n"
                               "with jobs.locked_output(sys.argv[1]):\n    print('held', flush=True)\n    sys.stdin.read()",
                               str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(jobs.JobError, match=f"being written by another run \\(pid {holder.pid} on "):
            he.run_humaneval(model, bench.parse_strategies("ar"), out, limit=1, max_new_bytes=8, progress=False)
    finally:
        holder.communicate("", timeout=60)
    assert not out.exists()  # the holder created it empty and removed it; the refused run wrote nothing
