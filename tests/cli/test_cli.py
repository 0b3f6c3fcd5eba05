import json
import os
import subprocess
import sys

import pytest

import blt_decode as bd
from blt_decode.cli import main
from blt_decode.model import tokenizer
from helpers import TINY, run_cli

def test_generate_json_prints_output_and_stats():
    out = run_cli("generate", *TINY, "--json", "--max-new-bytes", "12", "hello")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    expected = bd.generate("random:tiny", "hello", max_new_bytes=12)
    assert bytes.fromhex(data["output_bytes_hex"]) == expected.output
    assert data["stats"]["passes"]["decoder"] == expected.stats.passes.decoder
    assert data["stats"]["bandwidth_gb"] > 0
    assert data["stats"]["time_to_first_byte_s"] > 0
    assert data["strategy"] == "autoregressive" and data["backend"] == "eager"


def test_generate_streams_whole_characters(capsysbinary):
    assert main(["generate", *TINY, "--max-new-bytes", "8", "abc"]) == 0
    printed = capsysbinary.readouterr().out
    expected = bd.generate("random:tiny", "abc", max_new_bytes=8).output
    # the text view: invalid UTF-8 shown as U+FFFD, exactly as Generation.text
    assert printed == ("abc" + tokenizer.display(expected) + "\n").encode()


def test_listings_version_and_bare_help():
    strategies = run_cli("strategies")
    assert strategies.returncode == 0 and b"autoregressive" in strategies.stdout and b"alias: ar" in strategies.stdout
    assert run_cli("backends").returncode == 0
    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.decode().strip() == f"blt-decode {bd.__version__}"
    bare = run_cli()
    assert bare.returncode == 0 and b"generate" in bare.stdout and b"usage:" in bare.stdout


@pytest.fixture(scope="module")
def non_utf8_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    bd.save_model(bd.random_model("tiny"), path)
    (path / "config.json").write_bytes(b'{"format": "blt-decode", "note": "\xff\xfe"}')
    return path


BAD = {
    "negative max-new-bytes": (["generate", *TINY, "--max-new-bytes", "-5", "x"], "max_new_bytes"),
    "empty stop": (["generate", *TINY, "--stop", "", "x"], "stop"),
    "infinite temperature": (["generate", *TINY, "-o", "temperature=inf", "x"], "temperature"),
    "bool for int option": (["generate", *TINY, "--strategy", "blt-s", "-o", "k=true", "x"], "'k'"),
    "unparsable option": (["generate", *TINY, "--strategy", "blt-s", "-o", "k=eight", "x"], "'k'"),
    "option without value": (["generate", *TINY, "-o", "temperature", "x"], "key=value"),
    "unknown option": (["generate", *TINY, "-o", "beam=3", "x"], "valid options"),
    "unknown strategy": (["generate", *TINY, "--strategy", "nope", "x"], "registered strategies"),
    "seed expression": (["generate", *TINY, "--seed", "2**70", "x"], "--seed"),
    "seed too large": (["generate", *TINY, "--seed", str(2**70), "x"], "seed"),
    "negative threads": (["generate", *TINY, "--threads", "-1", "x"], "--threads"),
    "bad random spec": (["generate", "--model", "random:huge", "x"], "random:PRESET"),
    "missing model dir": (["generate", "--model", "/nonexistent/model", "x"], "neither a directory"),
    "bad device": (["generate", *TINY, "--device", "gpu", "x"], "device"),
    "missing prompt file": (["generate", *TINY, "--prompt-file", "/nonexistent/p.txt"], "prompt file"),
    "prompt twice": (["generate", *TINY, "--prompt-file", "-", "x"], "not both"),
    "no prompt": (["generate", *TINY], "no prompt"),
    "bench missing prompt file": (["bench", *TINY, "--prompt-file", "missing.txt", "--repeats", "1"], "missing.txt"),
    "bench unknown prompt set": (["bench", *TINY, "--prompt-set", "nope"], "--prompt-set"),
    "bench too many prompts": (["bench", *TINY, "--prompts", "1000", "--repeats", "1"], "holds 64 prompts"),
    "convert into non-empty dir": (["convert", "random:tiny", ".", "--to", "native"], "--overwrite"),
    "unknown command": (["frobnicate"], "invalid choice"),
    "option given twice": (["generate", *TINY, "-o", "temperature=0.5", "-o", "temperature=0.9", "x"], "given twice"),
    "bench option given twice": (["bench", *TINY, "--strategies", "blt-s:k=4+k=8", "--repeats", "1"], "given twice"),
    "max-new-bytes over the model": (["generate", *TINY, "--max-new-bytes", "100000", "x"], "at most 2047 new bytes"),
    "too many stops": (["generate", *TINY, *["--stop", "s"] * 33, "x"], "at most 32 are allowed"),
    "batch size over the bound": (["generate", *TINY, "--input", "-", "--output", "o.jsonl", "--batch-size", "5000"],
                                  "expected an integer in 1..4096"),
    # issue 33: each of these was a traceback or a crash
    "device that cannot decode": (["generate", *TINY, "--device", "meta", "x"], "use one of cpu, cuda"),
    "device that cannot decode, bench": (["bench", *TINY, "--device", "meta", "--repeats", "1"], "use one of cpu, cuda"),
    "threads beyond the CPUs": (["generate", *TINY, "--threads", "100000", "x"], "--threads: expected an integer in 0.."),
    "threads beyond the CPUs, serve": (["serve", *TINY, "--threads", "100000"], "--threads: expected an integer in 0.."),
    "threads beyond the CPUs, train": (["train", "entropy", "--out", "/nonexistent/run", "--threads", "100000"],
                                       "--threads must be an integer in 0.."),
    "random seed overflow": (["convert", "random:tiny:99999999999999999999999", "/nonexistent/out", "--to", "native"],
                             "SEED an integer in 0..2**64-1"),
    "random seed past 2**64-1": (["generate", "--model", f"random:tiny:{2**64}", "x"], "SEED an integer in 0..2**64-1"),
    "random seed not ASCII digits": (["generate", "--model", "random:tiny:\u00b2", "x"], "bad random model spec"),
    "heldout fraction 2": (["corpus", "build", "code", "--out", "/nonexistent/c", "--heldout-fraction", "2"],
                           "--heldout-fraction: expected a number in [0, 1), got '2'"),
    "heldout fraction nan": (["corpus", "build", "code", "--out", "/nonexistent/c", "--heldout-fraction", "nan"],
                             "--heldout-fraction: expected a number in [0, 1), got 'nan'"),
    "shard of 0 MiB": (["corpus", "build", "code", "--out", "/nonexistent/c", "--shard-mb", "0"],
                       "--shard-mb: expected an integer in 1..1024"),
    "negative max-bytes": (["corpus", "build", "code", "--out", "/nonexistent/c", "--max-bytes", "-5"],
                           "--max-bytes: expected an integer in 1.."),
    # neighbours: other flags that take sizes (an IndexError, or work without end)
    "more exactness prompts than the stdlib has": (["exactness", *TINY, "--prompts", "100000"], "--prompts must be in 1.."),
    "bench repeats without end": (["bench", *TINY, "--repeats", str(10**9)], "--repeats: expected an integer in 0..1000"),
    "train-bench sequence beyond any model": (["train-bench", "--seq-len", str(10**9)], "--seq-len: expected an integer in 8.."),
    "train-bench steps without end": (["train-bench", "--steps", str(10**9)], "--steps: expected an integer in 1..1000000"),
    "ray actors without end": (["generate", *TINY, "--input", "i", "--output", "o", "--ray-actors", str(10**6)],
                               "--ray-actors: expected an integer in 1..1024"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_invocations_print_one_line_and_exit_2(case):
    argv, expected = BAD[case]
    out = run_cli(*argv)
    err = out.stderr.decode()
    assert out.returncode == 2, (case, err)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("blt-decode: error:"), err
    assert expected in lines[0], lines[0]


def test_non_utf8_config_is_one_line(non_utf8_config):
    out = run_cli("generate", "--model", str(non_utf8_config), "x")
    err = out.stderr.decode().strip()
    assert out.returncode == 2 and len(err.splitlines()) == 1 and "config.json" in err and "Traceback" not in err


def test_option_strings_follow_the_declared_type():
    # cache is Literal["kv", "none"]: "none" stays the string, it is not Python None
    out = run_cli("generate", *TINY, "-o", "cache=none", "--json", "--max-new-bytes", "6", "ab")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["options"]["cache"] == "none"
    assert bytes.fromhex(data["output_bytes_hex"]) == bd.generate("random:tiny", "ab", cache="none", max_new_bytes=6).output
    out = run_cli("generate", *TINY, "-o", "top_k=none", "-o", "temperature=0.5", "--seed", "3", "--json", "ab")
    assert out.returncode == 0 and json.loads(out.stdout)["options"]["top_k"] is None


def test_prompt_as_raw_bytes_from_a_file_and_stdin(tmp_path):
    raw = b"caf\xe9 \xff\x00 bytes"  # not UTF-8
    expected = bd.generate("random:tiny", raw, max_new_bytes=8).output
    (tmp_path / "p.bin").write_bytes(raw)
    for args, stdin in ((["--prompt-file", str(tmp_path / "p.bin")], None), (["--prompt-file", "-"], raw)):
        out = run_cli("generate", *TINY, "--max-new-bytes", "8", "--json", *args, input=stdin)
        assert out.returncode == 0, out.stderr
        assert bytes.fromhex(json.loads(out.stdout)["output_bytes_hex"]) == expected


def test_non_utf8_argument_is_taken_as_its_bytes():
    raw = b"\xff\xfeabc"
    out = subprocess.run([sys.executable.encode(), b"-m", b"blt_decode.cli", b"generate", b"--model", b"random:tiny",
                          b"--json", b"--max-new-bytes", b"6", raw], capture_output=True)
    assert out.returncode == 0, out.stderr
    assert bytes.fromhex(json.loads(out.stdout)["output_bytes_hex"]) == bd.generate("random:tiny", raw, max_new_bytes=6).output


def test_dtype_and_device_flags():
    out = run_cli("generate", *TINY, "--dtype", "float64", "--device", "cpu", "--json", "--max-new-bytes", "6", "ab")
    assert out.returncode == 0, out.stderr
    model = bd.load_model("random:tiny", dtype=__import__("torch").float64)
    assert bytes.fromhex(json.loads(out.stdout)["output_bytes_hex"]) == bd.generate(model, "ab", max_new_bytes=6).output


def test_convert_reads_every_model_spec(tmp_path):
    out = run_cli("convert", "random:tiny:3", str(tmp_path / "out"), "--to", "native")
    assert out.returncode == 0, out.stderr
    loaded = bd.load_model(tmp_path / "out")
    assert bd.generate(loaded, "x", max_new_bytes=8).output == bd.generate("random:tiny:3", "x", max_new_bytes=8).output


def test_no_local_path_goes_into_a_converted_checkpoint(tmp_path):
    """convert recorded its source's absolute path ("from": "/..."), and carried training metadata with
    absolute paths (a run's --out): a checkpoint is meant to be shared. The source is recorded by name and
    sha256 of its files; absolute paths in carried metadata keep only their last component."""
    from blt_decode.checkpoints.native import save_model

    src = tmp_path / "trained" / "final"
    save_model(bd.random_model("tiny"), src, metadata={"training": {"out_dir": str(tmp_path / "trained"),
                                                                    "data": [str(tmp_path / "corpus"), "stdlib"]}})
    for source, name in ((str(src), "final"), ("random:tiny:3", "random:tiny:3")):
        out = tmp_path / f"out-{name.replace(':', '-')}"
        run = run_cli("convert", source, str(out), "--to", "native")
        assert run.returncode == 0, run.stderr
        for file in out.iterdir():
            assert str(tmp_path).encode() not in file.read_bytes(), file
        converted = json.loads((out / "config.json").read_text())["metadata"]["converted"]
        assert converted["from"] == name
    meta = json.loads((tmp_path / "out-final" / "config.json").read_text())["metadata"]
    assert meta["training"] == {"out_dir": "trained", "data": ["corpus", "stdlib"]}
    assert len(meta["converted"]["source_sha256"]) == 64
    # a relative source below the working directory is its own name: how the shipped model was made
    run = subprocess.run([sys.executable, "-m", "blt_decode.cli", "convert", "trained/final", "rel", "--to", "native"],
                         capture_output=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "rel" / "config.json").read_text())["metadata"]["converted"]["from"] == "trained/final"


def test_the_shipped_default_model_records_no_local_path():
    from blt_decode.checkpoints.resolve import DEFAULT_MODEL_DIR

    meta = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())["metadata"]

    def strings(value):
        if isinstance(value, dict):
            return [s for v in value.values() for s in strings(v)]
        if isinstance(value, list):
            return [s for v in value for s in strings(v)]
        return [value] if isinstance(value, str) else []

    assert not [s for s in strings(meta) if s.startswith(("/", "~"))]
    assert meta["converted"] == {"from": "runs/v3/default-blt10m/final", "dtype": "bfloat16"}


def test_a_prompt_file_is_read_within_a_bound(tmp_path):
    """--prompt-file /dev/zero read until memory ran out; a file is read up to 64 MiB, and no further."""
    big = tmp_path / "zeros.bin"
    with big.open("wb") as fh:
        fh.truncate((64 << 20) + 1)  # sparse
    for command in (["generate", *TINY, "--prompt-file", str(big)], ["bench", *TINY, "--prompt-file", str(big)]):
        out = run_cli(*command)
        err = out.stderr.decode().strip()
        assert out.returncode == 2 and len(err.splitlines()) == 1 and "more than 64 MiB" in err, err


def test_trace_colours_only_on_a_terminal_and_never_with_no_color():
    piped = run_cli("trace", *TINY, "--max-new-bytes", "8", "ab")
    assert piped.returncode == 0 and b"\x1b[" not in piped.stdout and b"|" in piped.stdout
    script = ("import pty, os, sys\n"
              "pid, fd = pty.fork()\n"
              "if pid == 0:\n"
              "    os.execvp(sys.executable, [sys.executable, '-m', 'blt_decode.cli', 'trace', '--model', 'random:tiny', "
              "'--max-new-bytes', '8', 'ab'])\n"
              "out = b''\n"
              "while True:\n"
              "    try:\n        data = os.read(fd, 4096)\n    except OSError:\n        break\n"
              "    if not data:\n        break\n    out += data\n"
              "os.waitpid(pid, 0)\n"
              "sys.stdout.write(str(b'\\x1b[' in out))\n")
    tty = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert tty.stdout == "True", tty.stderr
    no_color = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "NO_COLOR": "1"})
    assert no_color.stdout == "False", no_color.stderr


def test_compiled_backend_says_it_is_warming_up():
    out = run_cli("generate", *TINY, "--backend", "compiled", "--max-new-bytes", "0", "x")
    assert out.returncode == 0, out.stderr
    assert b"compiling" in out.stderr


def test_backend_auto_picks_compiled_where_its_warm_up_pays(capsys):
    """``--backend auto`` (the default of generate, serve and eval humaneval): compiled for a server and
    for work of at least AUTO_COMPILED_BYTES requested new bytes (one at a time or batched), said on
    stderr; eager below, silently."""
    from blt_decode.cli import build_parser
    from blt_decode.cli.common import AUTO_COMPILED_BYTES, backend_for

    parser = build_parser()
    for argv in (["generate", "x"], ["serve"], ["eval", "humaneval"]):
        assert parser.parse_args(argv).backend == "auto"
    one, batched = AUTO_COMPILED_BYTES["one"], AUTO_COMPILED_BYTES["batched"]
    assert backend_for("auto", new_bytes=one - 1, work="w") == "eager"
    assert backend_for("auto", new_bytes=batched - 1, work="w", batch_size=16) == "eager"
    assert capsys.readouterr().err == ""
    assert backend_for("auto", new_bytes=one, work="a job") == "compiled"
    assert backend_for("auto", new_bytes=batched, work="a job", batch_size=16) == "compiled"
    assert backend_for("auto", new_bytes=None, work="a server") == "compiled"
    assert capsys.readouterr().err.count("backend auto: compiled (a") == 3
    assert backend_for("eager", new_bytes=None, work="a server") == "eager"  # a name is taken as given
    with pytest.raises(bd.UnknownBackendError):
        backend_for("nope", new_bytes=None, work="a server")
    # where the compiled backend cannot run (no C++ compiler: a process whose CXX names none), auto says so
    # and runs eager (in a child: inductor reads CXX once, and its config is no place for a test's values)
    code = "from blt_decode.cli.common import backend_for; print(backend_for('auto', new_bytes=None, work='a server'))"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**os.environ, "CXX": "/nonexistent/c++"})
    assert child.returncode == 0 and child.stdout.strip() == "eager", child.stderr
    assert "eager, since the compiled backend cannot run: no C++ compiler" in child.stderr


def test_generate_defaults_to_eager_for_one_short_generation():
    out = run_cli("generate", *TINY, "--json", "--max-new-bytes", "4", "x")
    assert out.returncode == 0 and json.loads(out.stdout)["backend"] == "eager", out.stderr
    assert b"backend auto" not in out.stderr


def test_the_compiled_backend_without_a_compiler_is_one_line():
    out = run_cli("generate", *TINY, "--backend", "compiled", "--max-new-bytes", "4", "x", env={"CXX": "/nonexistent/c++"})
    lines = out.stderr.decode().strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, lines
    assert "the compiled backend cannot run: no C++ compiler" in lines[0] and "eager backend" in lines[0]


def test_every_command_reads_the_same_default_model():
    from blt_decode.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["exactness"]).model == parser.parse_args(["generate", "x"]).model == "default"
    assert parser.parse_args(["trace", "x"]).model == "default"


def test_generate_says_what_it_did_on_stderr_unless_quiet():
    """After the output, two lines on stderr: bytes, time, speed; forward passes per module, the Eq. 8
    weight traffic against AR's for the same bytes, acceptance (the README's BLT-S example promised
    fewer passes, and nothing showed them without --json)."""
    out = run_cli("generate", *TINY, "--strategy", "blt-s", "-o", "k=4", "--max-new-bytes", "24", "def f(x):")
    assert out.returncode == 0, out.stderr
    lines = out.stderr.decode().strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("blt-decode: ") for line in lines), lines
    g = bd.generate("random:tiny", "def f(x):", strategy="blt-s", k=4, max_new_bytes=24)
    ar = bd.generate("random:tiny", "def f(x):", max_new_bytes=24)
    assert f"{g.stats.new_bytes} bytes in " in lines[0] and "bytes/s" in lines[0] and "blt-s on eager" in lines[0]
    p = g.stats.passes
    assert f"patcher {p.patcher}, encoder {p.encoder}, global {p.global_}, decoder {p.decoder}" in lines[1]
    assert f"= {g.stats.bandwidth_gb / ar.stats.bandwidth_gb:.2f}x what AR reads for these bytes" in lines[1]
    assert f"accepted {g.stats.accepted_bytes}/{g.stats.drafted_bytes} drafted bytes" in lines[1]
    assert "seed" not in lines[0]  # greedy: no seed to report
    assert out.stdout.decode("utf-8", "replace").startswith("def f(x):")
    for flag in ("--quiet", "-q"):
        quiet = run_cli("generate", *TINY, "--max-new-bytes", "8", flag, "x")
        assert quiet.returncode == 0 and quiet.stderr == b"", quiet.stderr
    assert run_cli("generate", *TINY, "--max-new-bytes", "8", "--json", "x").stderr == b""  # the JSON has it all


# -- the parser's layout: flags next to handlers, train's flags from TrainConfig ------------------------
def _subcommands():
    import argparse

    from blt_decode.cli import build_parser

    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


def test_every_command_is_in_the_cli_reference():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "cli.md").read_text()
    missing = [name for name in _subcommands() if f"| `{name}" not in text]
    assert not missing, f"docs/cli.md has no row for {missing}"


def test_train_flags_are_generated_from_the_config_fields():
    """Each TrainConfig field with a flag in its metadata is a flag of `train` whose default is the field's
    alone: the parser leaves an unset flag out, so the config's default applies (it was stated three times:
    the field, add_argument and _cmd_train's mapping)."""
    import attrs

    from blt_decode.training.config import TrainConfig

    train = _subcommands()["train"]
    flags = {s for a in train._actions for s in a.option_strings}
    fields = {f.metadata["flag"]: f for f in attrs.fields(TrainConfig) if "flag" in f.metadata}
    assert flags - {"-h", "--help", "--png", "--resume", "--stop-after", "--no-progress"} - {"--no-bf16"} == set(fields)
    unset = vars(train.parse_args(["blt", "--out", "x"]))
    assert not set(unset) & {f.name for f in fields.values()} - {"out_dir"}, unset
    given = vars(train.parse_args(["blt", "--out", "x", "--steps", "7", "--lr", "0.5", "--data", "a", "b",
                                   "--block-sizes", "4", "8", "--no-bf16", "--compile", "--device", "cuda"]))
    assert {k: given[k] for k in ("steps", "lr", "data", "block_sizes", "bf16", "compile", "device")} == \
        {"steps": 7, "lr": 0.5, "data": ["a", "b"], "block_sizes": [4, 8], "bf16": False, "compile": True, "device": "cuda"}
    shown = " ".join(train.format_help().split())  # argparse wraps lines
    assert "the LR schedule spans them (default: 1000)" in shown and "(default: 4 8 16)" in shown


def test_a_train_value_the_config_refuses_is_one_line(tmp_path, capsys):
    assert main(["train", "entropy", "--out", str(tmp_path / "r"), "--steps", "0"]) == 2
    err = capsys.readouterr().err
    assert err == "blt-decode: error: --steps must be an integer in 1..1000000000, got 0\n"
    assert not (tmp_path / "r").exists()
