"""The OpenAI surface evaluation tools use, on a real server on loopback: chat completions (plain and
streaming, with the chat template), logprobs and echo on completions (equal to score), the byte tokenizer
endpoints, and lm-eval's own ``local-completions`` model scoring tasks through them exactly as the native
model does."""

from __future__ import annotations

import os

import httpx
import numpy as np
import openai
import pytest
import torch

import blt_decode as bd
from blt_decode.engine.core import Engine
from blt_decode.serving import tokens
from blt_decode.serving.app import ServerThread, create_app
from blt_decode.serving.chat import PLAIN, ChatTemplate

TIMEOUT_S = 60
TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"


@pytest.fixture(scope="module")
def model():
    return bd.random_model("tiny", 3, dtype=torch.float64)


@pytest.fixture(scope="module")
def server(model):
    with ServerThread(create_app(Engine(model, max_batch=4), model_name="tiny")) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT_S)


MESSAGES = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Add two numbers."}]


def _chat_direct(model, template, max_tokens, **kwargs):
    prompt = template.render(MESSAGES)
    g = bd.generate(model, prompt, max_new_bytes=max_tokens, stop=list(template.stops), **kwargs)
    text = g.output
    for s in template.stops:  # OpenAI leaves the stop sequence out of the text
        if g.stats.stop_reason == "stop_sequence" and text.endswith(s.encode()):
            text = text[: -len(s.encode())]
    return prompt, g, text.decode("utf-8", "replace")


def test_chat_is_generate_on_the_rendered_prompt(client, model):
    prompt, g, text = _chat_direct(model, PLAIN, 24)
    assert prompt == "You write Python.\n\nUser: Add two numbers.\n\nAssistant:"
    resp = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=24)
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == text
    assert choice.finish_reason == ("length" if g.stats.stop_reason == "max_new_bytes" else "stop")
    assert resp.usage.prompt_tokens == len(prompt.encode())


def test_chat_streaming_sends_the_role_then_the_same_text(client, model):
    _, _, text = _chat_direct(model, PLAIN, 24, strategy="blt-s", k=4)
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=24, stream=True,
                                                 stream_options={"include_usage": True},
                                                 extra_body={"strategy": "blt-s", "strategy_options": {"k": 4}}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0] for c in chunks if c.choices]
    assert "".join(p.delta.content or "" for p in pieces) == text
    assert pieces[-1].finish_reason in ("length", "stop") and all(p.finish_reason is None for p in pieces[:-1])
    assert chunks[-1].usage is not None and chunks[-1].choices == []


def test_a_chat_template_file_and_its_stops(model, tmp_path):
    path = tmp_path / "template.jinja"
    path.write_text(TEMPLATE)
    template = ChatTemplate.from_file(path, stops=["\n"])
    with ServerThread(create_app(Engine(model, max_batch=2), model_name="tiny", chat_template=template)) as srv:
        chat = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT_S)
        resp = chat.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=40)
        assert httpx.get(f"{srv.url}/tokenizer_info").json()["chat_template"] == TEMPLATE
    prompt, _, text = _chat_direct(model, template, 40)
    assert prompt == "<|system|>You write Python.\n<|user|>Add two numbers.\n<|assistant|>"
    assert resp.choices[0].message.content == text and "\n" not in text


def test_completion_logprobs_are_score(client, model):
    resp = client.completions.create(model="tiny", prompt="def f(x):", max_tokens=12, logprobs=3)
    choice = resp.choices[0]
    out = bytes.fromhex(resp.model_extra["blt_decode"]["choices"][0]["output_bytes_hex"])
    s = bd.score(model, b"def f(x):" + out, top_logprobs=3)
    lp = choice.logprobs
    assert lp.tokens == [tokens.token_text(b) for b in out]
    np.testing.assert_allclose(lp.token_logprobs, s.logprobs[9:], atol=1e-12)
    for top, ids, values in zip(lp.top_logprobs, s.top_ids[9:], s.top_logprobs[9:]):
        assert list(top) == [tokens.token_text(tokens.api_id(int(i))) for i in ids]
        np.testing.assert_allclose(list(top.values()), values, atol=1e-12)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_echo_returns_the_prompt_with_its_logprobs_and_max_tokens_0_scores_only(client, model):
    resp = client.completions.create(model="tiny", prompt="hello world", max_tokens=0, logprobs=1, echo=True)
    choice = resp.choices[0]
    assert choice.text == "hello world" and choice.finish_reason == "length"
    np.testing.assert_allclose(choice.logprobs.token_logprobs, bd.score(model, "hello world").logprobs, atol=1e-12)
    # a prompt sent as token ids after the sequence start: that token is echoed, with no logprob
    started = client.completions.create(model="tiny", prompt=[tokens.BOS, *b"hello"], max_tokens=1, logprobs=1, echo=True)
    lp = started.choices[0].logprobs
    assert lp.tokens[:6] == ["<bos>", "h", "e", "l", "l", "o"] and lp.token_logprobs[0] is None
    assert lp.top_logprobs[0] is None and len(lp.tokens) == 7
    np.testing.assert_allclose(lp.token_logprobs[1:6], bd.score(model, "hello").logprobs, atol=1e-12)


def test_chat_logprobs_carry_bytes(client, model):
    resp = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, logprobs=True, top_logprobs=2)
    content = resp.choices[0].logprobs.content
    out = bytes.fromhex(resp.model_extra["blt_decode"]["choices"][0]["output_bytes_hex"])
    assert [c.bytes for c in content] == [[b] for b in out[: len(content)]]
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.logprob - 1e-12 for c in content)


def test_the_tokenizer_endpoints_speak_bytes(server):
    info = httpx.get(f"{server.url}/tokenizer_info").json()
    assert info["eos_token"] == "<eos>" and info["bos_token"] == "<bos>" and "Assistant:" in info["chat_template"]
    ids = httpx.post(f"{server.url}/tokenize", json={"prompt": "h\u00e9"}).json()["tokens"]
    assert ids == [104, 0xC3, 0xA9]
    assert httpx.post(f"{server.url}/tokenize", json={"prompt": "<bos>"}).json()["tokens"] == [tokens.BOS]
    assert httpx.post(f"{server.url}/tokenize", json={"prompt": "a", "add_special_tokens": True}).json()["tokens"] == [256, 97]
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": [tokens.BOS, *ids]}).json()["prompt"] == "<bos>h\u00e9"


ERRORS = [
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "invalid_value", "messages", "empty"),
    ("/v1/chat/completions", {"model": "gpt-4", "messages": MESSAGES}, 404, "model_not_found", "model", "'tiny'"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     400, "unsupported_parameter", "messages", "text only"),
    ("/v1/chat/completions", {"model": "tiny", "messages": MESSAGES, "top_logprobs": 2}, 400, "invalid_value",
     "top_logprobs", "needs logprobs"),
    ("/v1/chat/completions", {"model": "tiny", "messages": MESSAGES, "logprobs": True, "stream": True}, 400,
     "unsupported_parameter", "logprobs", "stream"),
    ("/v1/chat/completions", {"model": "tiny", "messages": MESSAGES, "max_tokens": 10**6}, 400, "invalid_value",
     "max_tokens", "at most"),
    ("/v1/chat/completions", {"model": "tiny", "messages": MESSAGES, "tools": []}, 400, "unknown_parameter", "tools",
     "tools"),
    ("/tokenize", {"prompt": 3}, 400, "invalid_value", "prompt", "'prompt' (a string)"),
    ("/detokenize", {"tokens": [1, 999]}, 400, "invalid_value", "tokens", "0..257"),
]


@pytest.mark.parametrize("route,body,status,code,param,words", ERRORS, ids=[f"{e[0]}-{i}" for i, e in enumerate(ERRORS)])
def test_bad_requests_get_openai_errors(server, route, body, status, code, param, words):
    resp = httpx.post(f"{server.url}{route}", json=body, timeout=TIMEOUT_S)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert (error["code"], error["param"]) == (code, param) and words in error["message"], error
    assert httpx.get(f"{server.url}/health").status_code == 200  # and everyone else is still served


def test_lm_eval_local_completions_against_the_server_equals_the_native_model(server, model, tmp_path):
    """lm-eval's OpenAI-compatible completions model (remote byte tokenizer, logprobs + echo) scores the
    likelihood task and generates exactly as the native blt-decode model does."""
    pytest.importorskip("lm_eval", reason="needs the eval extra (lm-eval)")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    from blt_decode.evaluation import harness
    from helpers import write_tasks

    write_tasks(tmp_path)
    tasks = TaskManager(include_path=str(tmp_path), include_defaults=False)
    args = f"model=tiny,base_url={server.url}/v1/completions,tokenizer_backend=remote,max_length=2048"
    remote = harness.lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=["tiny_mc", "tiny_gen"],
                                             task_manager=tasks, log_samples=True, batch_size=2)
    native = harness.simple_evaluate(harness.BLTDecodeLM(model=model, batch_size=4), tasks=["tiny_mc", "tiny_gen"],
                                     task_manager=tasks, log_samples=True)
    for task in ("tiny_mc", "tiny_gen"):
        a = [s["resps"] for s in remote["samples"][task]]
        b = [s["resps"] for s in native["samples"][task]]
        if task == "tiny_mc":
            np.testing.assert_allclose([r[0][0] for doc in a for r in doc], [r[0][0] for doc in b for r in doc], atol=1e-9)
            assert [r[0][1] for doc in a for r in doc] == [r[0][1] for doc in b for r in doc]
        else:
            assert a == b
    assert remote["results"]["tiny_mc"]["acc,none"] == native["results"]["tiny_mc"]["acc,none"]


@pytest.mark.parametrize("content,words", [(None, "cannot read the chat template"), ("{{ broken", "chat template"),
                                           (b"\xff\xfe", "not UTF-8")])
def test_serve_with_a_bad_chat_template_is_one_line(tmp_path, capsys, content, words):
    from blt_decode.cli import main

    path = tmp_path / "template.jinja"
    if content is not None:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert main(["serve", "--model", "random:tiny", "--chat-template", str(path)]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1, err
