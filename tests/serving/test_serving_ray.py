"""Scale-out on a real local Ray cluster started here (loopback only, 2 CPUs): Ray Data batch jobs equal the
single-machine path, resume, and survive a killed actor; Ray Serve replicas answer as the direct API,
share the requests, stream through the proxy, and a replica killed mid-run loses no request.

One cluster serves the whole module (starting Ray costs seconds); every wait is bounded.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import threading
import time
import warnings
from pathlib import Path

import httpx
import openai
import pytest

import blt_decode as bd
from blt_decode.serving import local_ray_environment
from blt_decode.tools import jobs

local_ray_environment()  # before Ray is imported: every Ray process of these tests listens on loopback only
ray = pytest.importorskip("ray")  # the test extra installs it; a partial environment skips, not fails
with warnings.catch_warnings():  # Ray's own modules warn of their deprecations on import: not ours to fix
    warnings.simplefilter("ignore", DeprecationWarning)
    from ray import serve

    from blt_decode.serving import ray_serve
    from blt_decode.serving.ray_data import run_job_ray

pytestmark = pytest.mark.ray

MODEL = "random:tiny"
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def cluster():
    context = ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, log_to_driver=False)
    assert context.address_info["gcs_address"].startswith("127.0.0.1:"), "Ray was imported before its settings"
    try:
        yield
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def _write_jobs(path: Path, lines: list[dict]) -> list[jobs.JobItem]:
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return jobs.read_requests(path)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


LINES = [
    {"prompt": "hello", "max_new_bytes": 24},
    {"id": "raw", "prompt_hex": "fffe00", "strategy": "blt-s", "options": {"k": 4}, "max_new_bytes": 24},
    {"prompt": "sampled", "max_new_bytes": 20, "seed": 5, "options": {"temperature": 0.9}},
    {"id": 42, "prompt": "diffusion", "strategy": "blt-d", "options": {"block_size": 4}, "max_new_bytes": 24},
    {"prompt": "", "strategy": "blt-dv", "options": {"block_size": 3}, "max_new_bytes": 24},
    {"prompt": "stop here", "stop": ["\x01"], "max_new_bytes": 24},
    {"prompt": "more", "max_new_bytes": 30},
]


def test_ray_data_job_equals_the_single_machine_path_and_resumes(cluster, tmp_path):
    items = _write_jobs(tmp_path / "in.jsonl", LINES)
    single, on_ray = tmp_path / "single.jsonl", tmp_path / "ray.jsonl"
    jobs.run_job(MODEL, items, single, batch_size=2, progress=False)
    summary = run_job_ray(MODEL, items, on_ray, actors=2, batch_size=2, progress=False)
    assert (summary.total, summary.skipped, summary.done, summary.failed) == (7, 0, 7, 0)

    def by_id(records):
        return {r["id"]: (r["output"], r["output_bytes_hex"], r["stats"]["new_bytes"], r["stats"]["passes"])
                for r in records}

    expected = by_id(_records(single))
    got = _records(on_ray)
    assert sorted(r["id"] for r in got) == sorted(expected) and by_id(got) == expected
    assert set(got[0]) == set(_records(single)[0])  # the same record format

    # interrupted: three lines kept, the fourth torn; running again completes it, nothing twice
    lines = on_ray.read_text().splitlines()
    on_ray.write_text("\n".join(lines[:3]) + "\n" + lines[3][:10])
    again = run_job_ray(MODEL, items, on_ray, actors=2, batch_size=2, progress=False)
    assert (again.skipped, again.done) == (3, 4)
    resumed = _records(on_ray)
    assert sorted(r["id"] for r in resumed) == sorted(expected) and by_id(resumed) == expected


def _ray_processes(title: str) -> list[int]:
    """Process ids of this machine's Ray workers whose process title starts with ``ray::<title>``."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").strip()
            except OSError:
                continue
            if cmdline.startswith(f"ray::{title}".encode()):
                pids.append(int(entry))
    return pids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds Ray's worker processes in /proc")
def test_ray_data_actor_killed_mid_run_is_retried_and_nothing_is_lost_or_doubled(cluster, tmp_path):
    lines = [{"id": f"r{i}", "prompt": "x", "max_new_bytes": 500 + i} for i in range(16)]  # seconds of work
    items = _write_jobs(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    errors: list[BaseException] = []

    def job():
        try:
            run_job_ray(MODEL, items, out, actors=2, batch_size=2, progress=False)
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            errors.append(exc)

    runner = threading.Thread(target=job)
    runner.start()
    killed = None
    deadline = time.monotonic() + TIMEOUT_S
    while killed is None and runner.is_alive() and time.monotonic() < deadline:
        done = len(out.read_text().splitlines()) if out.exists() else 0
        busy = _ray_processes("MapWorker(MapBatches(GenerateActor)).submit")
        if done >= 1 and busy:  # some results written, a batch being decoded right now: kill its actor
            os.kill(busy[0], signal.SIGKILL)
            killed = (busy[0], done)
        time.sleep(0.05)
    runner.join(TIMEOUT_S)
    assert not runner.is_alive() and not errors, errors
    assert killed is not None and killed[1] < len(lines), "the job ended before an actor could be killed mid-run"
    records = _records(out)
    assert sorted(r["id"] for r in records) == sorted(item.id for item in items)  # each exactly once
    # the direct API's outputs, batched for speed (batched == alone is tests/engine/test_engine.py's property)
    expected = bd.generate_many(MODEL, [item.request for item in items], batch_size=16)
    assert {r["id"]: bytes.fromhex(r["output_bytes_hex"]) for r in records} == \
        {item.id: g.output for item, g in zip(items, expected)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def replicas(cluster):
    port = _free_port()
    ray_serve.run(MODEL, port=port, replicas=2, blocking=False, num_cpus=0.5, max_batch=4, model_name="tiny")
    yield f"http://127.0.0.1:{port}"
    serve.delete(ray_serve.APP_NAME)


def test_ray_serve_replicas_answer_as_the_direct_api_and_stream(replicas):
    model = bd.load_model(MODEL)
    pids = {httpx.get(f"{replicas}/health", timeout=10).json()["pid"] for _ in range(30)}
    assert len(pids) == 2, "requests were not spread over both replicas"
    client = openai.OpenAI(base_url=f"{replicas}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT_S)
    resp = client.completions.create(model="tiny", prompt=["a", "bc"], max_tokens=24,
                                     extra_body={"strategy": "blt-s", "strategy_options": {"k": 4}})
    assert [c.text for c in resp.choices] == [bd.generate(model, p, strategy="blt-s", k=4, max_new_bytes=24).text
                                              for p in ("a", "bc")]
    stream = client.completions.create(model="tiny", prompt="stream me", max_tokens=40, stream=True,
                                       extra_body={"strategy": "blt-d"})
    pieces = [e.choices[0].text for e in stream if e.choices]
    assert len(pieces) > 1 and "".join(pieces) == bd.generate(model, "stream me", strategy="blt-d", max_new_bytes=40).text
    bad = httpx.post(f"{replicas}/v1/completions", json={"model": "tiny", "prompt": "a", "strategy": "nope"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "unknown_strategy"


def test_ray_serve_replica_killed_mid_run_loses_no_request(replicas):
    """A replica process dies while decoding: its requests fail over (the openai client retries them on
    the other replica, as it does any 5xx), every prompt gets its one right answer, and Ray Serve's
    controller starts a replacement."""
    model = bd.load_model(MODEL)
    prompts = [f"k{i}" for i in range(12)]
    sent = []
    http = httpx.Client(event_hooks={"request": [lambda request: sent.append(request.url.path)]}, timeout=TIMEOUT_S)
    client = openai.OpenAI(base_url=f"{replicas}/v1", api_key="unused", max_retries=4, timeout=TIMEOUT_S,
                           http_client=http)
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(client.completions.create, model="tiny", prompt=p, max_tokens=600) for p in prompts]
        victim = None
        deadline = time.monotonic() + TIMEOUT_S
        while victim is None:  # a replica with requests in flight
            assert time.monotonic() < deadline, "no replica ever had live requests"
            health = httpx.get(f"{replicas}/health", timeout=10).json()
            if health["live_requests"] > 0:
                victim = health["pid"]
            time.sleep(0.05)
        os.kill(victim, signal.SIGKILL)
        texts = [f.result(timeout=TIMEOUT_S).choices[0].text for f in futures]
    assert texts == [bd.generate(model, p, max_new_bytes=600).text for p in prompts]
    assert sent.count("/v1/completions") > len(prompts), "no request was in flight on the killed replica"
    deadline = time.monotonic() + TIMEOUT_S
    while True:  # the controller replaces the dead replica
        deployment = serve.status().applications[ray_serve.APP_NAME].deployments["BLTDecode"]
        if deployment.replica_states.get("RUNNING") == 2:
            break
        assert time.monotonic() < deadline, deployment.replica_states
        time.sleep(0.5)
    pids = {httpx.get(f"{replicas}/health", timeout=10).json()["pid"] for _ in range(30)}
    assert victim not in pids and len(pids) == 2
