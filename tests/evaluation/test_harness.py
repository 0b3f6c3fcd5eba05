"""The lm-evaluation-harness model: its likelihoods are score's, its greedy generations generate's, and
lm-eval runs local task files through it (offline: dataset_path json, local data_files)."""

from __future__ import annotations

import os

import attrs
import numpy as np
import pytest
import torch

import blt_decode as bd
from blt_decode.evaluation import before_stop

lm_eval = pytest.importorskip("lm_eval", reason="needs the eval extra (lm-eval)")
from lm_eval.api.instance import Instance  # noqa: E402

from blt_decode.evaluation import harness  # noqa: E402
from helpers import GEN, MC, write_tasks  # noqa: E402

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the json builder and local files only: never the hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def model():
    return bd.random_model("tiny", 3, dtype=torch.float64)


@pytest.fixture(scope="module")
def lm(model):
    return harness.BLTDecodeLM(model=model, batch_size=3)


def _instances(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


PAIRS = [("The capital of France is", " Paris"), ("def add(a, b):\n    return", " a + b"), ("", "no context"),
         ("\u00fcber", "\u00df"), ("x" * 50, "y")]


def test_loglikelihoods_are_score_to_1e_6(lm, model):
    results = lm.loglikelihood(_instances("loglikelihood", PAIRS), disable_tqdm=True)
    for (context, continuation), (logp, greedy) in zip(PAIRS, results):
        ctx = context.encode()
        s = bd.score(model, ctx + continuation.encode())
        assert logp == pytest.approx(float(s.logprobs[len(ctx):].sum()), abs=1e-6)
        assert greedy == bool(s.greedy[len(ctx):].all())


def test_a_greedy_continuation_is_reported_greedy(lm, model):
    g = bd.generate(model, "def f(x):", max_new_bytes=12)
    # the longest prefix that is text (lm-eval hands over str); any prefix of a greedy output is greedy
    text = next(g.output[:n].decode() for n in range(len(g.output), 0, -1) if _is_utf8(g.output[:n]))
    [(logp, greedy)] = lm.loglikelihood(_instances("loglikelihood", [("def f(x):", text)]), disable_tqdm=True)
    assert greedy and logp < 0
    [(_, wrong)] = lm.loglikelihood(_instances("loglikelihood", [("def f(x):", text + "\x00")]), disable_tqdm=True)
    assert not wrong or bd.score(model, "def f(x):" + text + "\x00").greedy[-1]


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode()
        return True
    except UnicodeDecodeError:
        return False


def test_a_context_too_long_is_cut_on_the_left(lm, model):
    limit = model.config.max_seqlen - 1
    context, continuation = "a" * 40 + "b" * (limit - 3), "xyz"
    [(logp, _)] = lm.loglikelihood(_instances("loglikelihood", [(context, continuation)]), disable_tqdm=True)
    kept = context[-(limit - 3):].encode()
    assert logp == pytest.approx(float(bd.score(model, kept + b"xyz").logprobs[len(kept):].sum()), abs=1e-6)


def test_rolling_loglikelihood_scores_every_byte_once_with_the_longest_context(model):
    model = bd.api.with_config(model, attrs.evolve(model.config, max_seqlen=96))  # short windows, quick to score
    lm = harness.BLTDecodeLM(model=model, batch_size=3)
    short = "Shall I compare thee to a summer's day?"
    [whole] = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(short,)]), disable_tqdm=True)
    assert whole == pytest.approx(float(bd.score(model, short).logprobs.sum()), abs=1e-6)
    limit = model.config.max_seqlen - 1
    data = bytes(range(32, 127)) * (2 * limit // 95 + 3)  # longer than two windows
    windows = lm.rolling_windows(data)
    assert b"".join(scored for _, scored in windows) == data
    assert all(len(c) + len(s) == limit for c, s in windows[1:]) and windows[0] == (b"", data[:limit])
    [total] = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(data.decode(),)]), disable_tqdm=True)
    by_hand = sum(float(bd.score(model, c + s).logprobs[len(c):].sum()) for c, s in windows)
    assert total == pytest.approx(by_hand, abs=1e-6)


def test_greedy_generations_are_generate(lm, model):
    requests = [("def f(x):\n", {"until": ["\n\n"], "max_gen_toks": 20, "do_sample": False}),
                ("To be, or not", {"until": ["e"], "max_gen_toks": 16}), ("Hi", {"max_gen_toks": 5})]
    texts = lm.generate_until(_instances("generate_until", requests), disable_tqdm=True)
    for (context, kwargs), text in zip(requests, texts):
        stop = kwargs.get("until", [])
        g = bd.generate(model, context, max_new_bytes=kwargs["max_gen_toks"], stop=stop)
        assert text == before_stop(g.output, [s.encode() for s in stop]).decode("utf-8", "replace")
    assert lm.statistics()["generations"] >= 3


def test_any_strategy_and_its_options_generate_through_the_engine(model):
    lm = harness.BLTDecodeLM.create_from_arg_string("strategy=blt-s,k=4,batch_size=2", {"device": None})
    assert lm.options == {"k": 4} and lm.strategy == "blt-s"
    lm = harness.BLTDecodeLM(model=model, strategy="blt-s", k="4")
    [text] = lm.generate_until(_instances("generate_until", [("def f(x):", {"max_gen_toks": 24})]), disable_tqdm=True)
    assert text == bd.generate(model, "def f(x):", strategy="blt-s", k=4, max_new_bytes=24).text  # BLT-S is exactly greedy
    stats = lm.statistics()
    assert stats["drafted_bytes"] > 0 and 0 < stats["acceptance_rate"] <= 1 and stats["passes"]["decoder"] > 0


@pytest.mark.parametrize("kwargs,words", [({"strategy": "bogus"}, "unknown strategy"), ({"k": 4}, "option"),
                                          ({"strategy": "blt-s", "k": 0}, "option 'k'"),
                                          ({"batch_size": "auto"}, "batch_size=auto"), ({"dtype": "int8"}, "dtype"),
                                          ({"batch_size": "5000"}, r"batch_size must be an integer in 1\.\.4096"),
                                          ({"seed": 2**64}, r"seed must be an integer in 0\.\."),
                                          ({"device": "meta"}, "use one of cpu, cuda")])
def test_bad_model_args_are_typed_errors(model, kwargs, words):
    with pytest.raises(bd.BLTDecodeError, match=words):
        harness.BLTDecodeLM(model=model, **kwargs)


def test_unknown_generation_options_are_refused(lm):
    with pytest.raises(bd.InvalidRequestError, match="repetition_penalty"):
        lm.generate_until(_instances("generate_until", [("x", {"repetition_penalty": 1.2})]), disable_tqdm=True)


# -- lm-eval itself, on task files this test writes ------------------------------------------------------
def expected_accuracy(model) -> float:
    """acc by hand: lm-eval scores each choice after the question and its target delimiter (" ")."""
    right = 0
    for doc in MC:
        logps = [float(bd.score(model, doc["question"] + " " + c).logprobs[len(doc["question"].encode()):].sum())
                 for c in doc["choices"]]
        right += int(np.argmax(logps)) == doc["answer"]
    return right / len(MC)


def test_simple_evaluate_runs_local_tasks_with_the_native_model(tmp_path, model):
    from lm_eval.tasks import TaskManager

    write_tasks(tmp_path)
    lm = harness.BLTDecodeLM(model=model, batch_size=4)
    results = harness.simple_evaluate(lm, tasks=["tiny_mc", "tiny_gen"], task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
                                      log_samples=True)
    assert results["results"]["tiny_mc"]["acc,none"] == pytest.approx(expected_accuracy(model))
    generated = [s["resps"][0][0] for s in results["samples"]["tiny_gen"]]
    for doc, text in zip(GEN, generated):
        g = bd.generate(model, doc["prompt"], max_new_bytes=12, stop=["\n\n"])
        assert text == before_stop(g.output, [b"\n\n"]).decode("utf-8", "replace")
    stats = results["blt_decode"]
    assert stats["generations"] == len(GEN) and stats["scored_texts"] == sum(len(d["choices"]) for d in MC)


def test_the_lm_eval_command_line_runs_the_model(tmp_path, capsys):
    from blt_decode.cli import main

    write_tasks(tmp_path)
    rc = main(["eval", "lm-eval", "--model_args", "model=random:tiny:3,strategy=blt-d,block_size=4", "--tasks",
               "tiny_mc", "tiny_gen", "--include_path", str(tmp_path), "--batch_size", "2"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "tiny_mc" in out and "acc" in out and "blt-decode blt-d:block_size=4 on eager: 2 generations" in out


def test_documented_model_args_batch_size_and_device_work_beside_lm_evals_flags(tmp_path, capsys):
    """lm-eval passes its --batch_size and --device values (defaults included) beside --model_args; the keys
    both documented as model_args failed with "got multiple values for keyword argument". The key written
    in --model_args wins; the flag fills only what model_args leaves out."""
    from blt_decode.cli import main

    write_tasks(tmp_path)
    rc = main(["eval", "lm-eval", "--model_args", "model=random:tiny:3,batch_size=4,device=cpu", "--tasks", "tiny_mc",
               "--include_path", str(tmp_path), "--limit", "2", "--batch_size", "2", "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "tiny_mc" in out and "scored 5 texts" in out  # the first two questions: 3 + 2 choices
    flags = {"batch_size": 2, "max_batch_size": None, "device": "cpu"}  # what lm-eval's evaluator hands over
    lm = harness.BLTDecodeLM.create_from_arg_string("model=random:tiny:3,batch_size=4,device=cpu", flags)
    assert lm.batch_size == 4 and lm.model.device.type == "cpu"
    assert harness.BLTDecodeLM.create_from_arg_string("model=random:tiny:3", flags).batch_size == 2
    assert harness.BLTDecodeLM.create_from_arg_obj({"model": "random:tiny:3", "batch_size": 3}, flags).batch_size == 3


def test_the_documented_commands_run_on_the_example_tasks(tmp_path, capsys, monkeypatch):
    """docs/evaluation.md's lm-eval commands as written (the task files, then the run), at a tiny scale."""
    import re
    import shlex
    import subprocess
    import sys
    from pathlib import Path

    from blt_decode.cli import main

    page = (Path(__file__).resolve().parents[2] / "docs" / "evaluation.md").read_text()
    block = next(c for c in re.findall(r"```bash\n(.*?)```", page, re.S) if "write_heldout_tasks" in c)
    lines = block.replace("\\\n", " ").strip().splitlines()
    monkeypatch.chdir(tmp_path)
    write = shlex.split(lines[0])
    assert write[0] == "python"
    subprocess.run([sys.executable, *write[1:]], check=True, timeout=300)
    argv = shlex.split(lines[1])[1:]
    argv[argv.index("--model_args") + 1] = argv[argv.index("--model_args") + 1].replace("model=default", "model=random:tiny")
    assert main(argv + ["--limit", "2"]) == 0
    out = capsys.readouterr().out
    assert "blt_heldout_code_mc" in out and "blt_heldout_bpb" in out and "blt-decode blt-s:k=8 on eager: 2 generations" in out
