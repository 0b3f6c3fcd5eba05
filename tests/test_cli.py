import json
import subprocess
import sys

import blt_decode as bd
from blt_decode.cli import main, parse_option_value


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "blt_decode.cli", *args], capture_output=True, text=True)


def test_generate_json_prints_output_and_stats():
    out = run_cli("generate", "--model", "random:tiny", "--json", "--max-new-bytes", "12", "hello")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    expected = bd.generate("random:tiny", "hello", max_new_bytes=12)
    assert bytes.fromhex(data["output_bytes_hex"]) == expected.output
    assert data["stats"]["passes"]["decoder"] == expected.stats.passes.decoder
    assert data["stats"]["bandwidth_gb"] > 0
    assert data["strategy"] == "autoregressive" and data["backend"] == "eager"


def test_generate_streams_prompt_and_output(capsysbinary):
    assert main(["generate", "--model", "random:tiny", "--max-new-bytes", "8", "abc"]) == 0
    printed = capsysbinary.readouterr().out
    expected = bd.generate("random:tiny", "abc", max_new_bytes=8).output
    assert printed == b"abc" + expected + b"\n"


def test_listings():
    strategies = run_cli("strategies")
    assert strategies.returncode == 0 and "autoregressive" in strategies.stdout and "alias: ar" in strategies.stdout
    backends = run_cli("backends")
    assert backends.returncode == 0 and "eager" in backends.stdout


def test_errors_exit_2_with_a_message():
    out = run_cli("generate", "--model", "random:tiny", "--strategy", "nope", "x")
    assert out.returncode == 2 and "registered strategies" in out.stderr and "Traceback" not in out.stderr
    out = run_cli("generate", "--model", "random:huge", "x")
    assert out.returncode == 2 and "random:PRESET" in out.stderr
    out = run_cli("generate", "--model", "random:tiny", "-o", "temperature", "x")
    assert out.returncode == 2 and "key=value" in out.stderr


def test_option_values_are_typed():
    assert parse_option_value("8") == 8
    assert parse_option_value("0.7") == 0.7
    assert parse_option_value("true") is True
    assert parse_option_value("none") is None
    assert parse_option_value("kv") == "kv"
