import json
import subprocess
import sys

import pytest

from blt_decode import bench
from blt_decode.errors import InvalidOptionsError, UnknownStrategyError


def test_prompt_set_is_deterministic_and_held_out():
    a, b = bench.prompt_set(6), bench.prompt_set(6)
    assert a == b and len(a) == 6
    assert {p.source.split(":")[0] for p in a} == {"code", "plays"}
    assert all(p.prompt and p.reference for p in a)
    from blt_decode.corpus import HELDOUT_CODE, HELDOUT_PLAYS

    assert all(p.source.split(":", 1)[1] in HELDOUT_CODE + HELDOUT_PLAYS for p in a)


def test_strategy_specs_parse_and_validate():
    specs = bench.parse_strategies("ar,blt-s:k=4")
    assert [(s.strategy, s.options) for s in specs] == [("autoregressive", {}), ("blt-s", {"k": 4})]
    with pytest.raises(UnknownStrategyError):
        bench.parse_strategies("nope")
    with pytest.raises(InvalidOptionsError):
        bench.parse_strategies("blt-s:k=0")


def test_sampled_rows_get_an_ar_sampling_reference():
    specs = bench.with_ar_references(bench.parse_strategies(
        "blt-s:k=4,blt-s:k=8+temperature=0.7,blt-dv:block_size=4+temperature=0.7,ar:temperature=1.0+top_p=0.9,"
        "blt-s:k=auto+temperature=1.0+top_p=0.9"))
    assert [s.label for s in specs] == [
        "ar", "blt-s:k=4", "ar:temperature=0.7", "blt-s:k=8+temperature=0.7", "blt-dv:block_size=4+temperature=0.7",
        "ar:temperature=1.0+top_p=0.9", "blt-s:k=auto+temperature=1.0+top_p=0.9"]
    assert specs[2].options == {"temperature": 0.7}
    assert bench.sampling_key({"temperature": 0, "top_k": 5}) == bench.GREEDY_KEY


def test_released_projection_counts_follow_blt_1b():
    counts = bench.released_param_counts()["BLT-1B"]
    assert 0.9e9 < counts.global_ < 1.4e9  # "about 1B of the 1B model's parameters" sit in the global model
    assert counts.decoder > counts.encoder


def test_bench_cli_writes_json_and_ratios(tmp_path):
    out = tmp_path / "bench.json"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def add(a, b):\n---\nTo be, or not")
    run = subprocess.run(
        [sys.executable, "-m", "blt_decode.cli", "bench", "--model", "random:tiny", "--strategies",
         "ar,blt-s:k=4,blt-s:k=auto+temperature=0.8",
         "--prompt-file", str(prompts), "--max-new-bytes", "16", "--repeats", "1", "--json", str(out)],
        capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    data = json.loads(out.read_text())
    rows = {r["label"]: r for r in data["rows"]}
    assert rows["ar"]["bandwidth_vs_ar"] == 1.0 and rows["ar"]["exact_match_vs_ar"] == 1.0
    assert rows["blt-s:k=4"]["exact_match_vs_ar"] == 1.0  # BLT-S is greedy
    assert rows["blt-s:k=4"]["acceptance_rate"] is not None
    assert set(rows["ar"]["projected_vs_ar"]) == {"BLT-1B", "BLT-3B (est.)"}
    assert "| ar | eager |" in run.stdout
    sampled = rows["blt-s:k=auto+temperature=0.8"]
    assert sampled["reference"] == "ar:temperature=0.8" and sampled["exact_match_vs_ar"] is None
    assert rows["ar:temperature=0.8"]["bandwidth_vs_ar"] == 1.0 and rows["blt-s:k=4"]["reference"] == "ar"
