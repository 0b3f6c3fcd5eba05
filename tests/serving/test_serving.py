"""The OpenAI-compatible server: a real uvicorn server on a free loopback port, spoken to with the official
``openai`` client and with raw HTTP (httpx); every output equals :func:`blt_decode.generate` for the same
request. The engine steps in its background thread; requests share its batches."""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import attrs
import httpx
import openai
import pytest
from hypothesis import given
from hypothesis import strategies as st

import blt_decode as bd
from blt_decode.engine.core import Engine
from blt_decode.model import tokenizer
from blt_decode.serving.app import ServerThread, create_app
from blt_decode.serving.bridge import ChoiceText

MODEL = "random:tiny"
#: a prompt the tiny random model continues for thousands of bytes (no early EOS): for disconnects
LONG_PROMPT = "x"
TIMEOUT_S = 60


@pytest.fixture(scope="module")
def model():
    return bd.load_model(MODEL)


@pytest.fixture(scope="module")
def server(model):
    engine = Engine(model, max_batch=4)
    with ServerThread(create_app(engine, model_name="tiny", max_body_bytes=64 * 1024)) as srv:
        srv.engine = engine
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT_S)


def direct(model, prompt, max_tokens, strategy="autoregressive", stop=(), seed=None, **options) -> bd.Generation:
    return bd.generate(model, prompt, strategy=strategy, max_new_bytes=max_tokens, stop=stop, seed=seed, **options)


CASES = [
    ({}, {}),
    ({"temperature": 0.8, "top_p": 0.9, "seed": 7}, {"temperature": 0.8, "top_p": 0.9}),
    ({"extra_body": {"strategy": "blt-s", "strategy_options": {"k": 4}}}, {"strategy": "blt-s", "k": 4}),
    ({"extra_body": {"strategy": "blt-d", "strategy_options": {"block_size": 4}}, "temperature": 0},
     {"strategy": "blt-d", "block_size": 4}),
    ({"extra_body": {"strategy": "blt-dv"}}, {"strategy": "blt-dv"}),
]


@pytest.mark.parametrize("kwargs,expect", CASES, ids=["ar", "ar-sampled", "blt-s", "blt-d", "blt-dv"])
def test_completion_equals_generate(client, model, kwargs, expect):
    resp = client.completions.create(model="tiny", prompt="def f(x):", max_tokens=24, **kwargs)
    want = direct(model, "def f(x):", 24, seed=kwargs.get("seed"), **expect)
    (choice,) = resp.choices
    assert choice.text == want.text and choice.index == 0
    assert choice.finish_reason == ("length" if want.stats.stop_reason == "max_new_bytes" else "stop")
    extra = resp.model_extra["blt_decode"]
    assert extra["strategy"] == expect.get("strategy", "autoregressive")
    assert bytes.fromhex(extra["choices"][0]["output_bytes_hex"]) == want.output
    stats = extra["choices"][0]["stats"]
    assert stats["passes"] == {"patcher": want.stats.passes.patcher, "encoder": want.stats.passes.encoder,
                               "global_": want.stats.passes.global_, "decoder": want.stats.passes.decoder}
    assert resp.usage.prompt_tokens == len(b"def f(x):")
    assert resp.usage.completion_tokens == len(want.output) == stats["new_bytes"]
    assert resp.object == "text_completion" and resp.model == "tiny" and resp.id.startswith("cmpl-")


def test_list_of_prompts_and_raw_byte_prompts(client, model):
    prompts = ["a", "", "Once upon"]
    resp = client.completions.create(model="tiny", prompt=prompts, max_tokens=10,
                                     extra_body={"strategy": "blt-s"})
    assert [c.index for c in resp.choices] == [0, 1, 2]
    for choice, prompt in zip(resp.choices, prompts):
        assert choice.text == direct(model, prompt, 10, strategy="blt-s").text
    raw = b"\xff\xfe not UTF-8"
    resp = client.completions.create(model="tiny", prompt=list(raw), max_tokens=10)  # bytes as "token ids"
    assert resp.choices[0].text == direct(model, raw, 10).text and resp.usage.prompt_tokens == len(raw)


def test_streaming_equals_generate_and_ends_with_done(client, server, model):
    stream = client.completions.create(model="tiny", prompt=["p0", "p1"], max_tokens=40, stream=True,
                                       stream_options={"include_usage": True},
                                       extra_body={"strategy": "blt-dv", "strategy_options": {"block_size": 4}})
    texts, finish, usage, extras = {0: "", 1: ""}, {}, None, {}
    for event in stream:
        for choice in event.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
                extras[choice.index] = event.model_extra["blt_decode"]["choices"][0]
        usage = event.usage or usage
    for i in (0, 1):
        want = direct(model, f"p{i}", 40, strategy="blt-dv", block_size=4)
        assert texts[i] == want.text and bytes.fromhex(extras[i]["output_bytes_hex"]) == want.output
        assert finish[i] in ("stop", "length") and extras[i]["stats"]["new_bytes"] == len(want.output)
    assert usage.prompt_tokens == 4 and usage.completion_tokens == sum(e["stats"]["new_bytes"] for e in extras.values())

    # the wire format itself: server-sent events, JSON chunks, `data: [DONE]` last
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=TIMEOUT_S,
                      json={"model": "tiny", "prompt": "hi", "max_tokens": 12, "stream": True}) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == direct(model, "hi", 12).text
    assert all(c["object"] == "text_completion" for c in chunks) and chunks[-1]["choices"][0]["finish_reason"]


def test_stop_sequences_are_left_out_of_the_text(server, model):
    free = direct(model, "abc", 60).output
    # a stop sequence the output really reaches: two ASCII bytes from its middle (JSON's stop is text)
    start = next(i for i in range(8, len(free) - 1) if free[i] < 128 and free[i + 1] < 128)
    stop = free[start:start + 2]
    want = direct(model, "abc", 60, stop=stop)
    assert want.stats.stop_reason == "stop_sequence"
    body = {"model": "tiny", "prompt": "abc", "max_tokens": 60, "stop": [stop.decode(), "never"]}
    for stream in (False, True):
        resp = httpx.post(f"{server.url}/v1/completions", json={**body, "stream": stream}, timeout=TIMEOUT_S)
        text = resp.json()["choices"][0]["text"] if not stream else "".join(
            json.loads(line[6:])["choices"][0]["text"] for line in resp.text.splitlines() if line.startswith("data: {"))
        assert text == tokenizer.display(want.output[: -len(stop)]), stream
    resp = httpx.post(f"{server.url}/v1/completions", json={**body, "include_stop_str_in_output": True},
                      timeout=TIMEOUT_S)
    assert resp.json()["choices"][0]["text"] == want.text
    assert resp.json()["choices"][0]["finish_reason"] == "stop"


@given(data=st.binary(max_size=40), cuts=st.lists(st.integers(0, 40), max_size=6),
       stops=st.lists(st.binary(min_size=1, max_size=4), max_size=2), include=st.booleans())
def test_choice_text_never_splits_a_character_nor_shows_a_stop_sequence(data, cuts, stops, include):
    """Streamed pieces join to the text of the returned bytes; none holds a broken character that the
    whole text does not have; the stop sequence that ended the output is left out."""
    from blt_decode.engine.driver import Committer
    from blt_decode.engine.request import Request, prepare

    # what the engine would commit: the bytes up to and including the first stop sequence
    committer = Committer(prepare(Request(b"", stop=stops, max_new_bytes=len(data) + 1), 4096))
    out = b""
    for byte in data:
        fresh, _ = committer.commit([byte + tokenizer.OFFSET])
        out += fresh
        if committer.done:
            break
    reason = committer.reason or "max_new_bytes"
    text = ChoiceText([s for s in stops], include)
    bounds = sorted({0, len(out), *(min(c, len(out)) for c in cuts)})
    pieces = [text.feed(out[a:b]) for a, b in zip(bounds, bounds[1:])] + [text.finish(reason)]
    shown = out
    if reason == "stop_sequence" and not include:
        shown = out[: -max(len(s) for s in stops if out.endswith(s))]
    assert "".join(pieces) == tokenizer.display(shown) and text.returned == shown
    assert sum(p.count("\ufffd") for p in pieces) == tokenizer.display(shown).count("\ufffd")


def test_utf8_character_split_across_chunks_is_held_back():
    text = ChoiceText([])
    assert [text.feed(b"caf\xc3"), text.feed(b"\xa9 ok"), text.finish("eos")] == ["caf", "é ok", ""]
    text = ChoiceText([b"END"])
    assert [text.feed(b"xxE"), text.feed(b"N"), text.feed(b"D"), text.finish("stop_sequence")] == ["xx", "", "", ""]


def test_concurrent_requests_share_the_engine_batches(client, server, model):
    before = server.engine.stats()
    prompts = [f"concurrent {i}" for i in range(8)]

    def one(prompt):
        return client.completions.create(model="tiny", prompt=prompt, max_tokens=48).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(one, prompts))
    assert texts == [direct(model, p, 48).text for p in prompts]
    after = server.engine.stats()
    steps = after.steps - before.steps
    live_steps = after.mean_live * after.steps - before.mean_live * before.steps
    assert live_steps / steps > 1.5, "requests did not decode together"


ERRORS = [
    # (body or raw bytes, status, code, param, words in the message)
    (b"{not json", 400, "invalid_json", None, "not valid JSON"),
    (b"[1, 2]", 400, "invalid_json", None, "JSON object"),
    ({"prompt": "a"}, 422, "invalid_type", "model", "required"),
    ({"model": "tiny", "prompt": 5}, 422, "invalid_type", "prompt", "prompt must be a string"),
    ({"model": "tiny", "prompt": "a", "max_tokens": "8"}, 422, "invalid_type", "max_tokens", "integer"),
    ({"model": "tiny", "prompt": [1, 300]}, 422, "invalid_type", "prompt", "0..255"),
    ({"model": "tiny", "prompt": "a", "colour": "red"}, 400, "unknown_parameter", "colour", "colour"),
    ({"model": "gpt-4", "prompt": "a"}, 404, "model_not_found", "model", "'tiny'"),
    ({"model": "tiny", "prompt": "a", "strategy": "nope"}, 400, "unknown_strategy", "strategy", "blt-s"),
    ({"model": "tiny", "prompt": "a", "strategy": "blt-s", "strategy_options": {"k": 0}}, 400, "invalid_option",
     "strategy_options", "'k'"),
    ({"model": "tiny", "prompt": "a", "strategy_options": {"colour": 1}}, 400, "invalid_option", "strategy_options",
     "colour"),
    ({"model": "tiny", "prompt": "a", "strategy": "blt-d", "temperature": 0.7}, 400, "unsupported_parameter",
     "temperature", "autoregressive"),
    ({"model": "tiny", "prompt": "a", "temperature": 0.5, "strategy_options": {"temperature": 0.9}}, 400,
     "invalid_value", "temperature", "contradicts"),
    ({"model": "tiny", "prompt": "a" * 2047, "max_tokens": 8}, 400, "context_length_exceeded", "prompt",
     "2048 positions"),
    ({"model": "tiny", "prompt": "a", "max_tokens": -1}, 400, "invalid_value", "max_tokens", "max_tokens"),
    ({"model": "tiny", "prompt": "a", "seed": -3}, 400, "invalid_value", "seed", "seed"),
    ({"model": "tiny", "prompt": "a", "n": 2}, 400, "unsupported_parameter", "n", "n=2"),
    ({"model": "tiny", "prompt": "a", "logprobs": 21}, 400, "invalid_value", "logprobs", "0..20"),
    ({"model": "tiny", "prompt": "a", "echo": True, "stream": True}, 400, "unsupported_parameter", "echo",
     "not supported with stream"),
    ({"model": "tiny", "prompt": [256, 257]}, 422, "invalid_type", "prompt", "0..255"),
    ({"model": "tiny", "prompt": []}, 422, "invalid_type", "prompt", "empty list"),
    ({"model": "tiny", "prompt": "a", "temperature": -1}, 400, "invalid_value", "temperature", "option 'temperature'"),
    ({"model": "tiny", "prompt": "a", "stream_options": {"include_usage": True}}, 400, "invalid_value",
     "stream_options", "only allowed when stream is true"),
    (b'{"model": "tiny", "prompt": "' + b"a" * 70_000 + b'"}', 413, "request_too_large", None, "65536 bytes"),
    # every size a request controls has a bound, named in the 400
    ({"model": "tiny", "prompt": "a", "stop": ["x"] * 33}, 400, "invalid_value", "stop", "at most 32 are allowed"),
    ({"model": "tiny", "prompt": "a", "stop": ["ok", "y" * 257]}, 400, "invalid_value", "stop", "at most 256 bytes"),
    ({"model": "tiny", "prompt": "a", "max_tokens": 10**6}, 400, "invalid_value", "max_tokens", "at most 2047 new bytes"),
]


@pytest.mark.parametrize("body,status,code,param,words", ERRORS, ids=[f"{e[1]}-{e[2]}-{i}" for i, e in enumerate(ERRORS)])
def test_bad_requests_get_openai_errors(server, body, status, code, param, words):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    resp = httpx.post(f"{server.url}/v1/completions", timeout=TIMEOUT_S, **kwargs)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["code"], error["param"]) == (code, param) and words in error["message"], error
    assert error["type"] == "invalid_request_error"


def test_errors_disturb_nothing_and_neutral_sampling_fields_pass(client, server, model):
    # a request in flight while bad ones arrive finishes unchanged
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(lambda: client.completions.create(model="tiny", prompt="steady", max_tokens=200))
        for body, *_ in ERRORS:
            kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
            httpx.post(f"{server.url}/v1/completions", timeout=TIMEOUT_S, **kwargs)
        assert running.result().choices[0].text == direct(model, "steady", 200).text
    # temperature 0 and top_p 1 are what a strategy without them (blt-d decodes greedily) does anyway
    resp = client.completions.create(model="tiny", prompt="a", max_tokens=8, temperature=0, top_p=1,
                                     extra_body={"strategy": "blt-d"})
    assert resp.choices[0].text == direct(model, "a", 8, strategy="blt-d").text
    # where a strategy has them they are its options: BLT-S samples (speculative sampling) with a seed
    resp = client.completions.create(model="tiny", prompt="a", max_tokens=16, temperature=0.9, seed=4,
                                     extra_body={"strategy": "blt-s"})
    assert resp.choices[0].text == direct(model, "a", 16, strategy="blt-s", seed=4, temperature=0.9).text
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="a", max_tokens=1)
    missing = httpx.get(f"{server.url}/v2/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def _wait(predicate, timeout_s=TIMEOUT_S):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_client_disconnect_frees_the_slot(client, server, model):
    engine = server.engine
    _wait(lambda: engine.idle)
    ended, generated = engine.stats().requests, engine.stats().new_bytes
    body = {"model": "tiny", "prompt": LONG_PROMPT, "max_tokens": 1900}
    # streaming: read one chunk, then hang up
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True}, timeout=TIMEOUT_S) as resp:
        next(resp.iter_lines())
        assert engine.live_requests == 1
    _wait(lambda: engine.idle and engine.stats().requests == ended + 1)
    # not streaming: the client gives up waiting
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=httpx.Timeout(TIMEOUT_S, read=0.5))
    _wait(lambda: engine.idle and engine.stats().requests == ended + 2)
    assert engine.stats().new_bytes - generated < 1900  # both stopped early: together less than one whole
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'blt_decode_requests_total{outcome="cancelled",strategy="autoregressive"} 2.0' in metrics
    assert 'status="500"' not in metrics  # a client leaving is not a server error
    # and the server goes on serving
    assert client.completions.create(model="tiny", prompt="after", max_tokens=8).choices[0].text == \
        direct(model, "after", 8).text


def test_models_health_and_metrics(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    card = models.data[0].model_extra["blt_decode"]
    assert {"autoregressive", "blt-s", "blt-d", "blt-dv"} <= set(card["strategies"]) and card["max_batch"] == 4
    assert client.models.retrieve("tiny").id == "tiny"
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    client.completions.create(model="tiny", prompt="m", max_tokens=16, extra_body={"strategy": "blt-s"})
    metrics = httpx.get(f"{server.url}/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    for name in ("blt_decode_requests_total", "blt_decode_generated_bytes_total", "blt_decode_queue_depth",
                 "blt_decode_batch_occupancy", "blt_decode_live_requests", 'blt_decode_acceptance_rate{strategy="blt-s"}',
                 "blt_decode_time_to_first_byte_seconds_bucket", "blt_decode_decode_bytes_per_second_bucket",
                 'blt_decode_http_errors_total{code="model_not_found",status="404"}'):
        assert name in text, name


# -- the command line -----------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args, timeout=TIMEOUT_S):
    return subprocess.run([sys.executable, "-m", "blt_decode.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_serve_command_with_api_key(model):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "blt_decode.cli", "serve", "--model", MODEL, "--port", str(port),
                             "--api-key", "s3cret", "--max-batch", "2", "--log-level", "warning", "--backend", "eager"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:  # no key needed for health
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).completions.create(
                model=MODEL, prompt="a", max_tokens=4)
        unauthenticated = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "a"})
        assert unauthenticated.status_code == 401 and unauthenticated.json()["error"]["code"] == "invalid_api_key"
        for path in ("/metrics", "/v1/models", "/openapi.json", "/no/such/route"):  # guarded before routing
            assert httpx.get(f"{url}{path}").status_code == 401, path
        good = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model=MODEL, prompt="a", max_tokens=12).choices[0].text == direct(model, "a", 12).text
    finally:
        proc.terminate()
        proc.wait(timeout=TIMEOUT_S)


@pytest.mark.parametrize("args,words", [
    (["serve", "--replicas", "2"], "--replicas needs --ray"),
    (["serve", "--port", "70000"], "port 1..65535"),
    (["serve", "--port", "0"], "port 1..65535"),
    (["serve", "--api-key", ""], "--api-key is empty"),
    (["serve", "--backend", "nope"], "unknown backend"),
    (["generate", "x", "--ray"], "--ray runs a batch job"),
    (["serve", "--max-batch", "5000"], "expected an integer in 1..4096"),
    (["serve", "--max-body-bytes", str(2 << 30)], "--max-body-bytes: expected an integer in 1..1073741824"),
    (["serve", "--ray", "--replicas", "100000"], "--replicas: expected an integer in 1..1024"),
    (["serve", "--chat-template", "/dev/zero"], "has more than 65536 bytes, the most read"),
])
def test_serve_command_errors_are_one_line(args, words):
    run = run_cli(*args)
    assert run.returncode == 2 and words in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr


def test_serve_on_a_port_in_use_is_one_line():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        run = run_cli("serve", "--model", MODEL, "--port", str(busy.getsockname()[1]), "--backend", "eager")
    assert run.returncode == 2 and "cannot listen on 127.0.0.1" in run.stderr, run.stderr


def test_without_the_serving_extra_the_cli_says_what_to_install():
    """A plain install (no fastapi) still runs every other command, and `serve` says which extra it needs."""
    code = ("import sys; sys.modules['fastapi'] = None\n"  # as if fastapi were not installed
            "from blt_decode import cli\n"
            "assert cli.main(['strategies']) == 0\n"
            "sys.exit(cli.main(['serve', '--model', 'random:tiny']))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert run.returncode == 2, run.stderr
    # the README's own install command (blt-decode is installed from its checkout, not from an index)
    assert 'pip install -e ".[serve]"' in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert 'pip install -e ".[serve]"' in (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_the_load_test_runs_small_and_finds_every_response_equal_to_the_direct_api(tmp_path):
    """`blt-decode serve-loadtest`, bounded to a few requests (docs/serving.md measures the full one)."""
    out = tmp_path / "load.json"
    run = run_cli("serve-loadtest", "--model", MODEL, "--requests", "6", "--concurrency", "3", "--max-tokens", "16",
                  "--max-batch", "4", "--json", str(out), timeout=TIMEOUT_S * 2)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(out.read_text())
    assert result["server"]["errors"] == 0 and result["server"]["mismatches"] == 0
    assert result["server"]["requests"] == 6 and result["server"]["new_bytes"] == result["baseline"]["new_bytes"]
    assert "| blt-decode serve (max-batch 4) | 6 | 3 | 0 | 0 |" in run.stdout


def test_a_stopped_engine_fails_waiting_requests_instead_of_hanging(model, monkeypatch):
    from blt_decode.serving import bridge

    monkeypatch.setattr(bridge, "ENGINE_CHECK_S", 0.2)  # check often, so that the test is quick
    engine = Engine(model, max_batch=2)
    with ServerThread(create_app(engine, model_name="tiny")) as srv:
        engine.stop()  # as if the engine's thread had died
        assert httpx.get(f"{srv.url}/health").status_code == 503
        body = {"model": "tiny", "prompt": "a", "max_tokens": 8}
        whole = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=TIMEOUT_S)
        assert whole.status_code == 500 and "engine has stopped" in whole.json()["error"]["message"]
        streamed = httpx.post(f"{srv.url}/v1/completions", json={**body, "stream": True}, timeout=TIMEOUT_S)
        events = [line for line in streamed.text.splitlines() if line]
        assert "engine has stopped" in json.loads(events[-2][6:])["error"]["message"] and events[-1] == "data: [DONE]"


def test_model_cards_show_any_plugin_option_default_as_json():
    """A plugin's option may default to a factory or an arbitrary object: /v1/models still answers JSON."""
    from blt_decode.serving.app import _json_default

    @attrs.frozen
    class Options:
        banned: tuple = attrs.field(factory=tuple)
        weights: list = attrs.field(factory=lambda: [1.0, 2.0])
        table: dict = attrs.field(factory=dict)
        k: int = 4

    defaults = {f.name: _json_default(f.default) for f in attrs.fields(Options)}
    assert defaults == {"banned": [], "weights": [1.0, 2.0], "table": "{}", "k": 4}
    json.dumps(defaults)


# -- no request can stall the others -------------------------------------------------------------------
@pytest.fixture(scope="module")
def roomy_server(model):
    """A server with the default body limit (1 MiB), room for big requests."""
    engine = Engine(model, max_batch=8)
    with ServerThread(create_app(engine, model_name="tiny")) as srv:
        srv.engine = engine
        yield srv


def _health_latencies(url: str, count: int, pause_s: float = 0.1) -> list[float]:
    latencies = []
    for _ in range(count):
        start = time.perf_counter()
        assert httpx.get(f"{url}/health", timeout=TIMEOUT_S).status_code == 200
        latencies.append(time.perf_counter() - start)
        time.sleep(pause_s)
    return latencies


def test_health_answers_while_heavy_requests_run(roomy_server, model):
    """The heaviest request allowed (the most prompts' worth of streams, each with the longest stop list)
    streams while one far over the limits (3000 stop sequences of 300 bytes: 900 KB, under the body
    limit) arrives: the latter is refused at once with a 400 naming the limit, the former finishes
    right, and /health answers promptly throughout. The old server took the 3000 stops and matched
    every prefix of every one on its event loop after every chunk: /health and every stream waited."""
    stops = [("q" + chr(65 + i % 26)) * 128 for i in range(32)]  # 32 stops of 256 bytes: the limits
    heavy = {"model": "tiny", "prompt": [f"p{i}" for i in range(16)], "max_tokens": 64, "stop": stops, "stream": True}
    flood = {"model": "tiny", "prompt": "a", "max_tokens": 64, "stop": ["z" * 299 + str(i % 10) for i in range(3000)]}
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        streamed = pool.submit(lambda: httpx.post(f"{roomy_server.url}/v1/completions", json=heavy, timeout=TIMEOUT_S * 4))
        refused = pool.submit(lambda: httpx.post(f"{roomy_server.url}/v1/completions", json=flood, timeout=TIMEOUT_S * 4))
        latencies = _health_latencies(roomy_server.url, 15)
        refused, streamed = refused.result(), streamed.result()
    assert max(latencies) < 2.0, latencies
    assert refused.status_code == 400, refused.text[:300]
    assert refused.json()["error"]["param"] == "stop" and "at most 32 are allowed" in refused.json()["error"]["message"]
    texts: dict[int, str] = {}
    for line in streamed.text.splitlines():
        if line.startswith("data: {"):
            for choice in json.loads(line[6:])["choices"]:
                texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    for i in (0, 7, 15):
        assert texts[i] == direct(model, f"p{i}", 64, stop=[t.encode() for t in stops]).text


def test_a_request_that_cannot_be_admitted_gets_a_503_and_the_server_serves_on(model, address_space_limit, caplog):
    """Memory runs out while the engine admits one request (a real allocation failure, under an
    address-space limit): that request gets a 503 naming why and the failure is logged; /health stays
    200 and every other request is served. The old engine's thread died: the request hung and every
    later one got a 500."""
    import attrs as _attrs

    from blt_decode.model.presets import BLT_PRESETS

    long_model = bd.random_model(_attrs.evolve(BLT_PRESETS["tiny"], max_seqlen=1 << 17))
    available = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo").read().splitlines()
                     if line.startswith("MemAvailable:"))
    if available < 3 << 30:
        pytest.skip("needs 3 GiB of free memory for the up-front check to let the big request through")
    engine = Engine(long_model, max_batch=16)
    with ServerThread(create_app(engine, model_name="tiny")) as srv:
        body = {"model": "tiny", "prompt": "a", "max_tokens": 8}
        assert httpx.post(f"{srv.url}/v1/completions", json=body, timeout=TIMEOUT_S).status_code == 200
        with caplog.at_level("ERROR", logger="blt_decode.engine.core"), address_space_limit(512 << 20):
            big = httpx.post(f"{srv.url}/v1/completions", json={**body, "max_tokens": 33_000}, timeout=TIMEOUT_S)
            health = httpx.get(f"{srv.url}/health", timeout=TIMEOUT_S)
        assert big.status_code == 503, big.text[:300]
        assert big.json()["error"]["code"] == "engine_unavailable"
        assert "could not admit the request" in big.json()["error"]["message"]
        assert health.status_code == 200 and "could not admit the request" in caplog.text
        after = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=TIMEOUT_S)
        assert after.status_code == 200
        assert after.json()["choices"][0]["text"] == bd.generate(long_model, "a", max_new_bytes=8).text


@pytest.mark.parametrize("args", [["--concurrency", "0"], ["--concurrency", "-2"], ["--requests", "0"],
                                  ["--max-batch", "0"], ["--timeout", "0"], ["--skip-server"]])
def test_the_load_test_refuses_bad_counts_before_starting_a_server(args):
    """`serve-loadtest --concurrency 0` waited forever for a connection from an empty pool, its server
    child left running; every count is now checked first, in one line."""
    start = time.monotonic()
    run = run_cli("serve-loadtest", "--model", MODEL, *args)
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert time.monotonic() - start < TIMEOUT_S
