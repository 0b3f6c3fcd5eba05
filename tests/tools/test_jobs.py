"""Batch jobs: JSONL in, JSONL out, equal to generate() per request, resumable, bad lines refused up front."""

import json
import os
import subprocess
import sys

import pytest

import blt_decode as bd
from blt_decode.tools import jobs
LINES = [
    {"prompt": "hello"},
    {"id": "raw", "prompt_hex": "fffe00", "strategy": "blt-s", "options": {"k": 4}},
    {"prompt": "sampled", "max_new_bytes": 7, "seed": 5, "options": {"temperature": 0.9}},
    {"id": 42, "prompt": "diffusion", "strategy": "blt-d", "options": {"block_size": 4}, "stop": ["\n"]},
    {"prompt": "", "strategy": "blt-dv", "options": {"block_size": 3}},
]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "blt_decode.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def expected(line: dict, default_max: int) -> bytes:
    prompt = bytes.fromhex(line["prompt_hex"]) if "prompt_hex" in line else line["prompt"]
    return bd.generate("random:tiny", prompt, strategy=line.get("strategy", "autoregressive"),
                       max_new_bytes=line.get("max_new_bytes", default_max), seed=line.get("seed"),
                       stop=line.get("stop", ()), **line.get("options", {})).output


@pytest.fixture
def job(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(line) for line in LINES) + "\n\n")
    return src, tmp_path / "out.jsonl"


def test_results_equal_generate_and_resume_skips_finished(job):
    src, out = job
    run = run_cli("generate", "--model", "random:tiny", "--input", str(src), "--output", str(out),
                  "--max-new-bytes", "12", "--batch-size", "2")
    assert run.returncode == 0, run.stderr
    records = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    ids = ["0", "raw", "2", "42", "4"]
    assert sorted(records) == sorted(ids)
    for ident, line in zip(ids, LINES):
        if line.get("seed") is None and line.get("options", {}).get("temperature"):
            continue
        assert bytes.fromhex(records[ident]["output_bytes_hex"]) == expected(line, 12), ident
        assert records[ident]["output"] == bd.model.tokenizer.display(bytes.fromhex(records[ident]["output_bytes_hex"]))
        assert records[ident]["stats"]["new_bytes"] == len(bytes.fromhex(records[ident]["output_bytes_hex"]))

    # an interrupted run: two results written, the third torn mid-line
    text = out.read_text().splitlines()
    out.write_text(text[0] + "\n" + text[1] + "\n" + text[2][: len(text[2]) // 2])
    again = run_cli("generate", "--model", "random:tiny", "--input", str(src), "--output", str(out),
                    "--max-new-bytes", "12")
    assert again.returncode == 0, again.stderr
    assert "2 already in" in again.stderr and "3 requests done" in again.stderr
    resumed = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in resumed) == sorted(ids)  # nothing lost, nothing twice
    assert {r["id"]: r["output_bytes_hex"] for r in resumed} == {i: records[i]["output_bytes_hex"] for i in ids}


@pytest.mark.parametrize("line,message", [
    ("not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"prompt": 5}', "'prompt' must be a string"),
    ('{"prompt": "a", "prompt_hex": "00"}', "exactly one of"),
    ('{"prompt_hex": "zz"}', "hex digits"),
    ('{"prompt": "a", "colour": "red"}', "unknown field"),
    ('{"prompt": "a", "options": {"k": 0}, "strategy": "blt-s"}', "option 'k'"),
    ('{"prompt": "a", "strategy": "nope"}', "registered strategies"),
    ('{"prompt": "a", "max_new_bytes": -1}', "max_new_bytes"),
    ('{"prompt": "a", "id": true}', "'id'"),
])
def test_bad_lines_fail_before_decoding_with_one_line(tmp_path, line, message):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "fine"}\n' + line + "\n")
    out = tmp_path / "out.jsonl"
    run = run_cli("generate", "--model", "random:tiny", "--input", str(src), "--output", str(out))
    err = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(err) == 1 and message in err[0] and "in.jsonl:2" in err[0], run.stderr
    assert not out.exists()


def test_duplicate_ids_and_flag_conflicts(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n')
    with pytest.raises(jobs.JobError, match="duplicate id 'a'"):
        jobs.read_requests(src)
    for extra in (["prompt"], ["--json"], []):
        args = ["generate", "--model", "random:tiny", "--input", str(src), *extra]
        if extra != []:
            args += ["--output", str(tmp_path / "o.jsonl")]
        run = run_cli(*args)
        assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("text", ["some notes\nmore notes\n", "one line of notes\n",
                                  '{"id": "a", "output": ""}\nnotes\n'])
def test_an_output_file_that_is_not_ours_is_left_alone(tmp_path, text):
    out = tmp_path / "out.jsonl"
    out.write_text(text)
    with pytest.raises(jobs.JobError, match="refusing to append"):
        jobs.finished_ids(out)
    assert out.read_text() == text


def _failed(ident: str) -> str:
    return json.dumps(jobs.result_record(ident, None, None, RuntimeError("boom")))


def test_an_unfinished_last_line_is_dropped_or_completed(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text(f'{_failed("a")}\n{_failed("b")[:12]}')  # torn mid-write: dropped, "b" runs again
    assert jobs.finished_ids(out) == {"a"} and out.read_text() == f'{_failed("a")}\n'
    out.write_text(f'{_failed("a")}\n{_failed("b")}')  # a whole record without its newline: completed
    assert jobs.finished_ids(out) == {"a", "b"}
    jobs.append_records(out, [json.loads(_failed("c"))])
    assert out.read_text().splitlines() == [_failed("a"), _failed("b"), _failed("c")]


@pytest.mark.parametrize("line", [
    '{"id": "a"}',  # an id alone
    '{"id": 0, "prompt": "hello"}',  # an input line
    '{"id": "a", "output": "x", "output_bytes_hex": "zz", "stats": {}}',  # not hex
    '{"id": "a", "error": "x", "extra": 1}',  # a field this tool never writes
])
def test_only_result_records_count_as_finished(tmp_path, line):
    """A JSON line with an "id" is not a finished request: only what result_record writes is."""
    out = tmp_path / "out.jsonl"
    out.write_text(line + "\n")
    with pytest.raises(jobs.JobError, match="out.jsonl:1: not a result line"):
        jobs.finished_ids(out)


def test_the_output_may_not_be_the_input(job, tmp_path):
    """Writing the results into the input file (by its name or through a link) would read its own input
    lines as finished requests and exit 0 having done nothing."""
    src, _ = job
    link = tmp_path / "link.jsonl"
    link.symlink_to(src)
    before = src.read_text()
    for output in (src, link, tmp_path / "." / "in.jsonl"):
        run = run_cli("generate", "--model", "random:tiny", "--input", str(src), "--output", str(output))
        assert run.returncode == 2 and "is the --input file" in run.stderr, run.stderr
        assert len(run.stderr.strip().splitlines()) == 1
    assert src.read_text() == before


def test_default_options_belong_to_the_default_strategy(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "a"}\n{"prompt": "b", "strategy": "ar"}\n{"prompt": "c", "strategy": "blt_s"}\n')
    items = jobs.read_requests(src, {"strategy": "blt-s", "options": {"k": 8}})
    assert [i.request.options for i in items] == [{"k": 8}, {}, {"k": 8}]  # "blt_s" is an alias of blt-s


def test_a_duplicate_implicit_id_says_where_it_comes_from(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": 1, "prompt": "x"}\n{"prompt": "y"}\n')
    with pytest.raises(jobs.JobError, match=r"in.jsonl:2: duplicate id '1' \(this line has no 'id'"):
        jobs.read_requests(src)


# -- special files, bounded reading, one writer at a time (issue 33) -----------------------------------------
def _one_line_error(run) -> str:
    err = run.stderr.strip()
    assert run.returncode == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("blt-decode: error:"), err
    return err


@pytest.mark.parametrize("kind", ["/dev/full", "/dev/null", "fifo", "directory"])
def test_an_output_that_is_not_a_regular_file_is_refused(job, tmp_path, kind):
    """/dev/full read zeros until the OOM killer came (22.6 GB), a FIFO blocked forever: the output is read
    back to resume, so only a regular file is taken, and nothing is read from anything else."""
    src, _ = job
    output = {"fifo": tmp_path / "fifo", "directory": tmp_path}.get(kind, kind)
    if kind == "fifo":
        os.mkfifo(output)
    run = subprocess.run([sys.executable, "-m", "blt_decode.cli", "generate", "--model", "random:tiny", "--input",
                          str(src), "--output", str(output)], capture_output=True, text=True, timeout=120)
    err = _one_line_error(run)
    assert "not a regular file" in err and str(output) in err, err
    with pytest.raises(jobs.JobError, match="not a regular file"):
        jobs.finished_ids(output)


def test_output_to_its_own_stdout_pipe_is_refused_not_read_back(job):
    """`--output /dev/stdout | cat` read its own output pipe to resume, and hung."""
    src, _ = job
    run = subprocess.run([sys.executable, "-m", "blt_decode.cli", "generate", "--model", "random:tiny", "--input",
                          str(src), "--output", "/dev/stdout"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, timeout=120)
    assert "a pipe, not a regular file" in _one_line_error(run) and run.stdout == ""


def test_reading_is_bounded_by_line_and_file_size(tmp_path, monkeypatch):
    long_line = tmp_path / "zeros.jsonl"
    with long_line.open("wb") as fh:  # sparse: 17 MiB of NUL bytes and no newline, as /dev/zero gives
        fh.truncate(jobs.MAX_LINE_BYTES + (1 << 20))
    with pytest.raises(jobs.JobError, match=r"zeros.jsonl:1: a line longer than 16 MiB"):
        jobs.finished_ids(long_line)
    assert long_line.stat().st_size == jobs.MAX_LINE_BYTES + (1 << 20)  # refused untouched, not truncated as torn
    with pytest.raises(jobs.JobError, match=r"zeros.jsonl:1: a line longer than 16 MiB"):
        jobs.read_requests(long_line)
    many = tmp_path / "many.jsonl"
    many.write_text('{"prompt": "x"}\n' * 100)
    monkeypatch.setattr(jobs, "MAX_FILE_BYTES", 1000)  # the bound, not 4 GiB of test data
    with pytest.raises(jobs.JobError, match="many.jsonl is larger than"):
        jobs.read_requests(many)


@pytest.mark.parametrize("line,words", [
    ("[" * 100_000, "nested too deeply"),
    ('{"prompt": "x", "seed": ' + "9" * 5000 + "}", "more digits than Python converts"),
])
def test_a_hostile_input_line_is_one_line_not_a_traceback(tmp_path, line, words):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "fine"}\n' + line + "\n")
    err = _one_line_error(run_cli("generate", "--model", "random:tiny", "--input", str(src), "--output",
                                  str(tmp_path / "out.jsonl")))
    assert "in.jsonl:2:" in err and words in err, err
    assert not (tmp_path / "out.jsonl").exists()  # created for the lock, removed again: the run wrote nothing
    out = tmp_path / "out.jsonl"
    out.write_text(line + "\n")
    with pytest.raises(jobs.JobError, match=f"out.jsonl:1: .*{words}"):
        jobs.finished_ids(out)


def _wait_for(path, process, seconds=300):
    """Until ``path`` exists (the holder has taken its lock), or the holder died."""
    import time

    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_two_runs_on_one_output_the_second_is_refused_naming_the_first(job):
    """Two `generate --input ... --output same.jsonl` at once wrote every record twice. The first takes a
    lock on the output before it reads its input (here a pipe the test fills later, so the first run is
    certainly still running when the second starts); the second exits 2 naming the first's pid."""
    src, out = job
    first = subprocess.Popen([sys.executable, "-m", "blt_decode.cli", "generate", "--model", "random:tiny", "--input",
                              "/dev/stdin", "--output", str(out), "-q"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(jobs.lock_record_path(out), first)
        second = run_cli("generate", "--model", "random:tiny", "--input", str(src), "--output", str(out))
        err = _one_line_error(second)
        assert f"is being written by another run (pid {first.pid} on " in err, err
        _, first_err = first.communicate(src.read_text(), timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, first_err
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert sorted(ids) == sorted(map(str, ["0", "raw", "2", 42, "4"]))  # each request once
    assert not jobs.lock_record_path(out).exists()  # the record goes with the lock
    again = run_cli("generate", "--model", "random:tiny", "--input", str(src), "--output", str(out))
    assert again.returncode == 0 and "0 requests done" in again.stderr and len(out.read_text().splitlines()) == 5


def test_a_killed_holder_leaves_no_lock_behind(job):
    """The kernel drops a flock with its process: a run killed mid-job does not block the next one (its
    stale record is overwritten)."""
    src, out = job
    holder = subprocess.Popen([sys.executable, "-m", "blt_decode.cli", "generate", "--model", "random:tiny", "--input",
                               "/dev/stdin", "--output", str(out)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    _wait_for(jobs.lock_record_path(out), holder)
    holder.kill()
    holder.wait(timeout=60)
    assert jobs.lock_record_path(out).exists()  # stale
    run = run_cli("generate", "--model", "random:tiny", "--input", str(src), "--output", str(out))
    assert run.returncode == 0, run.stderr
    assert len(out.read_text().splitlines()) == len(LINES)


def test_the_lock_nests_within_one_process(tmp_path):
    out = tmp_path / "out.jsonl"
    with jobs.locked_output(out):
        with jobs.locked_output(out):  # run_job inside the CLI's hold
            pass
        assert jobs.lock_record_path(out).exists()
    assert not out.exists() and not jobs.lock_record_path(out).exists()  # created empty here: removed


def test_a_lock_record_that_is_a_fifo_does_not_hang_the_refusal(tmp_path):
    """Who holds an output is read from OUTPUT.lock without blocking: a FIFO planted there (a holder that
    could not write its record) gives 'has not said who it is', not a refusal that never comes."""
    out = tmp_path / "out.jsonl"
    os.mkfifo(jobs.lock_record_path(out))
    assert jobs._holder(out) == "a process that has not said who it is"
