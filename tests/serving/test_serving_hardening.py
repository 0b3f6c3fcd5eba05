"""The server against hostile and careless clients (issue 33, section 4), on a real uvicorn server on a
loopback port with real clients (the ``openai`` client, httpx, raw sockets): chat roles it does not render
are refused, a chat template is rendered in a worker process under a time and a size limit while /health
answers, bad chat flags stop ``serve`` at start-up, a client that leaves mid-body is a 499 (not a 500),
and half-sent heads and bodies and connections over the limit are answered and closed within their
bounds. The bounds here are seconds and the waits tens of seconds: no check depends on timing."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
import torch

import blt_decode as bd
from blt_decode.engine.core import Engine
from blt_decode.serving.app import ServerThread, create_app
from blt_decode.serving.chat import ChatTemplate, RenderLimits
from blt_decode.serving.connections import ConnectionLimits

TIMEOUT_S = 60
ROLES = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
#: a template that is ordinary unless a message asks it to misbehave
HOSTILE = (
    "{% for m in messages %}"
    "{% if m.content == 'spin' %}{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}"
    "{% endfor %}{% endfor %}{% endfor %}"
    "{% elif m.content == 'add' %}{{ m.content + 1 }}"
    "{% elif m.content == 'refuse' %}{{ raise_exception('this template takes no refusals') }}"
    "{% elif m.content == 'huge' %}{{ 'x' * 10**10 }}"
    "{% elif m.content == 'long' %}{{ 'x' * 3000000 }}"
    "{% endif %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}<|assistant|>"
)


@pytest.fixture(scope="module")
def model():
    return bd.random_model("tiny", 3, dtype=torch.float64)


@pytest.fixture(scope="module")
def server(model):
    template = ChatTemplate(HOSTILE, ("\n<|user|>",), name="hostile.jinja")
    app = create_app(Engine(model, max_batch=4), model_name="tiny", chat_template=template,
                     render_limits=RenderLimits(timeout_s=3.0))
    with ServerThread(app) as srv:
        yield srv


def _chat(url: str, content: str, role: str = "user", timeout: float = TIMEOUT_S) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", timeout=timeout,
                      json={"model": "tiny", "messages": [{"role": role, "content": content}], "max_tokens": 4})


# -- roles ------------------------------------------------------------------------------------------------
def test_developer_is_rendered_as_system(model):
    """OpenAI's `developer` is its system role: rendered as system, not left out of the prompt."""
    template = ChatTemplate(ROLES, name="roles.jinja")
    with ServerThread(create_app(Engine(model, max_batch=2), model_name="tiny", chat_template=template)) as srv:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT_S)
        resp = client.chat.completions.create(model="tiny", max_tokens=12, messages=[
            {"role": "developer", "content": "Answer in Python."}, {"role": "user", "content": "Add two numbers."}])
    prompt = template.render([{"role": "system", "content": "Answer in Python."},
                              {"role": "user", "content": "Add two numbers."}])
    assert prompt.startswith("<|system|>Answer in Python.\n")
    assert resp.usage.prompt_tokens == len(prompt.encode())
    assert resp.choices[0].message.content == bd.generate(model, prompt, max_new_bytes=12).text


@pytest.mark.parametrize("role", ["tool", "System", "function", "moderator", "x" * 5000])
def test_other_roles_are_refused_naming_the_allowed_ones(server, role):
    resp = httpx.post(f"{server.url}/v1/chat/completions", timeout=TIMEOUT_S, json={
        "model": "tiny", "max_tokens": 4,
        "messages": [{"role": "user", "content": "hi"}, {"role": role, "content": "ok"}]})
    assert resp.status_code == 400, resp.text[:300]
    error = resp.json()["error"]
    assert error["param"] == "messages.1.role" and error["code"] == "invalid_value", error
    assert "system, developer, user, assistant" in error["message"] and len(error["message"]) < 300, error


@pytest.mark.parametrize("message,extra,status,code,param,words", [
    ({"role": "user", "content": [{"type": "text"}]}, {}, 400, "invalid_value", "messages",
     "messages[0].content[0] is of type 'text' but has no 'text'"),
    ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x"}}]}, {}, 400,
     "unsupported_parameter", "messages", "messages[0].content[0]: message content of type 'image_url' is not supported"),
    ({"role": "user", "content": "hi"}, {"max_completion_tokens": -1}, 400, "invalid_value", "max_completion_tokens",
     "max_completion_tokens must be an integer >= 0"),
    ({"role": "user", "content": "hi"}, {"stop": [f"s{i}" for i in range(32)]}, 400, "invalid_value", "stop",
     "the server adds its 1 chat stop sequences; at most 32"),
])
def test_neighbouring_chat_fields_get_errors_that_name_what_was_sent(server, message, extra, status, code, param, words):
    """A text part without text was called unsupported, an image part was refused by the name of its
    payload, a bad max_completion_tokens was blamed on max_tokens (which the client did not send), and
    32 stops plus the template's were refused as '33 sequences' the client never sent."""
    resp = httpx.post(f"{server.url}/v1/chat/completions", timeout=TIMEOUT_S,
                      json={"model": "tiny", "messages": [message], **extra})
    assert resp.status_code == status, resp.text[:300]
    error = resp.json()["error"]
    assert (error["code"], error["param"]) == (code, param) and words in error["message"], error


# -- the template in a worker ------------------------------------------------------------------------------
def test_a_template_that_spins_times_out_while_health_and_other_chats_are_served(server):
    """A template with three nested loops of 100 000 (10**15 iterations) used to run on the event loop:
    every client and /health froze. It now runs in a worker process that is killed at the time limit
    (3 s here): the request gets a 400 naming the template, and meanwhile /health answers and an
    ordinary chat request is served by another worker."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        spinning = pool.submit(_chat, server.url, "spin")
        latencies = []
        while not spinning.done():
            start = time.perf_counter()
            assert httpx.get(f"{server.url}/health", timeout=TIMEOUT_S).status_code == 200
            latencies.append(time.perf_counter() - start)
            if len(latencies) == 2:
                assert _chat(server.url, "hello").status_code == 200
            time.sleep(0.1)
        resp = spinning.result()
    assert resp.status_code == 400, resp.text[:300]
    error = resp.json()["error"]
    assert error["code"] == "chat_template_error" and "hostile.jinja" in error["message"], error
    assert "took longer than 3 s" in error["message"], error
    assert latencies and max(latencies) < 2.0, latencies  # the old server: no answer until the loops end
    assert _chat(server.url, "hello again").status_code == 200  # a fresh worker replaced the killed one


@pytest.mark.parametrize("content,words", [
    ("add", "can only concatenate str"),
    ("refuse", "this template takes no refusals"),
    ("huge", "ran out of memory"),
    ("long", "rendered more than 1048576 bytes"),
])
def test_template_errors_are_400s_naming_the_template(server, content, words):
    resp = _chat(server.url, content)
    assert resp.status_code == 400, resp.text[:300]
    error = resp.json()["error"]
    assert error["code"] == "chat_template_error" and error["param"] == "messages", error
    assert "chat template hostile.jinja" in error["message"] and words in error["message"], error
    assert "Error" not in error["message"], error  # no Python exception names
    assert _chat(server.url, "fine").status_code == 200


def test_the_template_is_not_evaluated_when_it_is_compiled():
    """Jinja2 folds constant expressions when it compiles: `{{ 'x' * 10**10 }}` was computed by the server
    itself as it loaded the template. Nothing is evaluated before a render (in a worker): compiling two
    1 GB expressions leaves the compiling process's peak memory where importing blt-decode puts it. In a
    child under a 3 GiB address-space limit, so that a regression fails here, not the machine."""
    code = ("import resource; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))\n"
            "from blt_decode.serving.chat import ChatTemplate\n"
            "ChatTemplate(\"{{ 'x' * 1000000000 }}{{ 'y'|center(1000000000) }}\", name='folded.jinja')\n"
            # VmHWM: this process's own peak (ru_maxrss would count the forking parent's pages, which exec folds in)
            "print([int(l.split()[1]) // 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0])\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert run.returncode == 0, run.stderr[-2000:]
    assert int(run.stdout.split()[-1]) < 900, f"{run.stdout.split()[-1]} MiB at peak"  # ~225 MiB here


# -- start-up checks ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,words", [
    (["--chat-stop", ""], "--chat-stop"),
    (["--chat-stop", "s" * 300], "at most 256 bytes"),
    ([arg for i in range(33) for arg in ("--chat-stop", f"s{i}")], "at most 32"),
    (["--header-timeout", "0"], "--header-timeout must be"),
    (["--body-timeout", "nan"], "--body-timeout must be"),
    (["--keep-alive-timeout", "1e9"], "--keep-alive-timeout must be"),
    (["--max-connections", "0"], "--max-connections must be"),
])
def test_serve_refuses_bad_chat_stops_and_limits_at_start_up(args, words):
    run = _serve(*args)
    assert run.returncode == 2 and words in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr


@pytest.mark.parametrize("source,words", [
    ("{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}{% endfor %}{% endfor %}"
     "{% endfor %}", "took longer than"),
    ("{{ messages[0].content + 1 }}", "can only concatenate str"),
    ("{% if messages[0].role == 'system' %}{{ raise_exception('no system messages') }}{% endif %}", "no system messages"),
])
def test_serve_refuses_a_template_that_cannot_render_a_sample_conversation(tmp_path, source, words):
    path = tmp_path / "template.jinja"
    path.write_text(source)
    run = _serve("--chat-template", str(path))
    assert run.returncode == 2 and words in run.stderr and str(path) in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr


def _serve(*args: str) -> subprocess.CompletedProcess:
    """`blt-decode serve` in a child on a free port: the old server started (and served for ever) here, so
    a regression is a timeout after TIMEOUT_S, not a hung test run."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        return subprocess.run([sys.executable, "-m", "blt_decode.cli", "serve", "--model", "random:tiny",
                               "--port", str(port), *args], capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"serve {' '.join(args)} started instead of refusing")


# -- disconnects and slow clients ------------------------------------------------------------------------------
def _raw(url: str, timeout: float = TIMEOUT_S) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    return sock


def _head(path: str, length: int) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def _read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (or the socket's timeout: an error)."""
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def _metric(url: str, text: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=TIMEOUT_S).text.splitlines():
        if line.startswith(text):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_client_that_leaves_mid_body_is_a_499_not_a_500(server, caplog):
    """It was logged as a 500 with a traceback and counted as status 500; now one log line and 499."""
    counted = 'blt_decode_http_errors_total{code="client_disconnected",status="499"}'
    before = _metric(server.url, counted)
    with caplog.at_level(logging.INFO, logger="blt_decode.serving"):
        for path in ("/v1/chat/completions", "/v1/completions"):
            with _raw(server.url) as sock:
                sock.sendall(_head(path, 1000) + b'{"model": "tiny", "messages": [')
            deadline = time.monotonic() + TIMEOUT_S
            while _metric(server.url, counted) < before + 1:
                assert time.monotonic() < deadline, "the disconnect was not counted"
                time.sleep(0.05)
            before += 1
    assert 'status="500"' not in httpx.get(f"{server.url}/metrics").text
    records = [r for r in caplog.records if r.name == "blt_decode.serving"]
    assert [r.getMessage() for r in records] == ["client disconnected during POST /v1/chat/completions",
                                                 "client disconnected during POST /v1/completions"]
    assert not any(r.exc_info for r in records)


@pytest.fixture(scope="module")
def strict_server(model):
    limits = ConnectionLimits(header_timeout_s=1.0, body_timeout_s=1.0, max_connections=8)
    with ServerThread(create_app(Engine(model, max_batch=2), model_name="tiny", limits=limits)) as srv:
        yield srv


def test_half_sent_heads_and_bodies_are_answered_408_and_closed_while_others_are_served(strict_server, model):
    """A client that sends half a body, or half a head, or nothing, was held for ever; now each gets a 408
    (or, having sent nothing, is closed) once its 1 s bound has passed, and other clients are served."""
    url = strict_server.url
    with _raw(url) as half_body, _raw(url) as half_head, _raw(url) as silent:
        half_body.sendall(_head("/v1/completions", 1000) + b'{"model": "tiny", "prompt": "a"')
        half_head.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
        served = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 6},
                            timeout=TIMEOUT_S)
        assert served.status_code == 200
        assert served.json()["choices"][0]["text"] == bd.generate(model, "a", max_new_bytes=6).text
        body_answer, head_answer, silent_answer = _read_all(half_body), _read_all(half_head), _read_all(silent)
    assert body_answer.startswith(b"HTTP/1.1 408 "), body_answer[:200]
    error = json.loads(body_answer.split(b"\r\n\r\n", 1)[1])["error"]
    assert error["code"] == "request_timeout" and "body did not arrive within 1 s" in error["message"]
    assert head_answer.startswith(b"HTTP/1.1 408 "), head_answer[:200]
    assert b"no whole request head arrived within 1 s" in head_answer
    assert silent_answer == b""
    assert httpx.get(f"{url}/health", timeout=TIMEOUT_S).status_code == 200


def test_connections_over_the_limit_get_a_json_503(model):
    """Beyond max_connections (8 here) a connection's request is answered 503 (JSON) and it is closed;
    once the held ones are gone, requests are served again."""
    limits = ConnectionLimits(header_timeout_s=TIMEOUT_S, max_connections=8)  # the held ones stay while we look
    with ServerThread(create_app(Engine(model, max_batch=2), model_name="tiny", limits=limits)) as srv:
        _over_the_limit(srv.url)


def _over_the_limit(url: str) -> None:
    held = [_raw(url) for _ in range(8)]
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while True:  # until the server has taken the held connections
            resp = httpx.get(f"{url}/health", timeout=TIMEOUT_S)
            if resp.status_code == 503:
                break
            assert time.monotonic() < deadline, "no 503 over the limit"
            time.sleep(0.05)
        assert resp.json()["error"]["code"] == "too_many_connections" and "(8)" in resp.json()["error"]["message"]
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + TIMEOUT_S
    while httpx.get(f"{url}/health", timeout=TIMEOUT_S).status_code != 200:
        assert time.monotonic() < deadline, "not served again after the held connections closed"
        time.sleep(0.05)
