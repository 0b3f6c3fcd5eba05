"""The batched engine: every request decodes exactly as it would alone, whatever else is in the batch."""

import time
from pathlib import Path

import attrs
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import blt_decode as bd
from blt_decode import testing
from blt_decode.engine.core import CancelledError, Engine, EngineError
from blt_decode.errors import InvalidOptionsError, PromptTooLongError
from blt_decode.plugins import registry as plugins
from helpers import requests, structural_unmasking_tie, tutorial_strategies

DOCS = Path(__file__).resolve().parents[2] / "docs"

@given(model=testing.tiny_models(), batch=st.lists(requests(), min_size=1, max_size=7), batch_size=st.integers(1, 4))
def test_batched_equals_alone(model, batch, batch_size):
    assume(not structural_unmasking_tie(model, batch))
    testing.assert_batched_equals_alone(model, batch, batch_size=batch_size)


def test_empty_and_non_utf8_prompts_in_one_batch():
    model = bd.random_model("tiny", 5, dtype=torch.float64)
    prompts = [b"", b"\xff\xfe\x00", "naïve café".encode(), b"x" * 40, b""]
    testing.assert_batched_equals_alone(model, [bd.Request(p, max_new_bytes=30) for p in prompts], batch_size=3)


def test_requests_end_early_in_every_way():
    model = testing.with_eos_for_byte(bd.random_model("tiny", 2, dtype=torch.float64), ord("e"))
    free = bd.generate(model, b"abc", max_new_bytes=40)
    reqs = [
        bd.Request(b"abc", max_new_bytes=40),  # EOS (or the limit)
        bd.Request(b"abc", max_new_bytes=3),  # max_new_bytes
        bd.Request(b"abc", max_new_bytes=40, stop=free.output[2:4] or b"z"),  # a stop sequence
        bd.Request(b"abc", max_new_bytes=0),
        bd.Request(b"zz", strategy="blt-s", options={"k": 5}, max_new_bytes=40),
    ]
    out = testing.assert_batched_equals_alone(model, reqs, batch_size=2)
    assert {g.stats.stop_reason for g in out} >= {"max_new_bytes", "stop_sequence"}


def test_no_leakage_between_requests():
    model = bd.random_model("tiny", 3, dtype=torch.float64)
    others = [b"first prompt", b"second", b"\x00\x01\x02"]
    base = bd.generate_many(model, [b"watched", *others], max_new_bytes=32, batch_size=4)
    changed = bd.generate_many(model, [b"watched", *[o[::-1] + b"!" for o in others]], max_new_bytes=32, batch_size=4)
    assert base[0].output == changed[0].output and base[0].stats.passes == changed[0].stats.passes
    for prompt in (b"watched but different", b""):
        swapped = bd.generate_many(model, [prompt, *others], max_new_bytes=32, batch_size=4)
        assert [g.output for g in swapped[1:]] == [g.output for g in base[1:]]


def test_generate_many_keeps_input_order_and_options():
    model = bd.random_model("tiny", 1)
    prompts = [f"prompt {i}".encode() for i in range(9)]
    many = bd.generate_many(model, prompts, strategy="blt-s", k=3, max_new_bytes=12, batch_size=4)
    for p, g in zip(prompts, many):
        assert g.prompt == p and g.output == bd.generate(model, p, strategy="blt-s", k=3, max_new_bytes=12).output


def test_bad_requests_fail_before_anything_runs():
    model = bd.random_model("tiny")
    with pytest.raises(InvalidOptionsError):
        bd.generate_many(model, [b"ok", bd.Request(b"bad", strategy="blt-s", options={"k": 0})])
    with pytest.raises(PromptTooLongError):
        bd.generate_many(model, [b"x" * model.config.max_seqlen])
    with pytest.raises(EngineError, match="max_batch"):
        Engine(model, max_batch=0)
    for bad in ("big", -1, 0, True):
        with pytest.raises(EngineError, match="max_capacity must be an integer >= 1"):
            Engine(model, max_capacity=bad)


# -- failures stay with their request ------------------------------------------------------------------
@attrs.frozen
class _FailOpts:
    after: int = 3
    how: str = "raise"  # "raise": a RuntimeError; "bad-id": an out-of-range id; "interrupt": KeyboardInterrupt


class _FailingStrategy:
    name, description, aliases, Options = "fails-midway", "test double: raises after a few bytes", (), _FailOpts

    def lookahead(self, options):
        return 0

    def decode(self, session, context, options):
        logits = session.prefill(context.prompt_ids)[-1]
        for _ in range(options.after):
            token = int(logits.argmax())
            yield [token]
            logits = session.append([token])[-1]
        if options.how == "bad-id":
            session.append([9999])
        if options.how == "interrupt":
            raise KeyboardInterrupt
        raise RuntimeError("this strategy broke on purpose")


@pytest.fixture
def failing_strategy():
    class Plugin:
        @bd.hookimpl
        def register_strategies(self, register):
            register(_FailingStrategy())

    plugins.reset()
    plugins.get_plugin_manager().register(Plugin(), name="fails-midway-plugin")
    yield "fails-midway"
    plugins.reset()


def test_a_raising_strategy_fails_only_its_own_request(failing_strategy):
    model = bd.random_model("tiny", 4, dtype=torch.float64)
    engine = Engine(model, max_batch=3)
    good = [engine.submit(p, max_new_bytes=20) for p in (b"one", b"two")]
    bad = engine.submit(b"three", strategy=failing_strategy)
    late = engine.submit(b"four", strategy="blt-s", k=3, max_new_bytes=20)
    engine.run_until_idle()
    with pytest.raises(RuntimeError, match="broke on purpose"):
        bad.result()
    assert bad.output is not None and len(bad.output) == 3  # what it committed before failing is kept
    for s, p in zip(good + [late], (b"one", b"two", b"four")):
        opts = {"strategy": "blt-s", "k": 3} if p == b"four" else {}
        assert s.result().output == bd.generate(model, p, max_new_bytes=20, **opts).output


def test_an_out_of_range_id_fails_only_the_strategy_that_passed_it(failing_strategy):
    """Ids are checked before a call joins the batch: the batched pass of the others never sees them."""
    model = bd.random_model("tiny", 4, dtype=torch.float64)
    engine = Engine(model, max_batch=3)
    good = [engine.submit(p, max_new_bytes=20) for p in (b"one", b"two")]
    bad = engine.submit(b"three", strategy=failing_strategy, how="bad-id")
    engine.run_until_idle()
    with pytest.raises(bd.StrategyError, match=r"strategy 'fails-midway' passed id 9999 to session.append; token ids are 0\.\.259"):
        bad.result()
    for s, p in zip(good, (b"one", b"two")):
        assert s.result().output == bd.generate(model, p, max_new_bytes=20).output


def test_an_interrupt_inside_a_strategy_stops_the_driver_not_just_its_request(failing_strategy):
    """Ctrl-C while a strategy's own code runs is the user's, not the request's: it leaves step()."""
    model = bd.random_model("tiny", 4, dtype=torch.float64)
    engine = Engine(model, max_batch=2)
    other = engine.submit(b"one", max_new_bytes=20)
    hit = engine.submit(b"two", strategy=failing_strategy, how="interrupt")
    with pytest.raises(KeyboardInterrupt):
        engine.run_until_idle()
    assert hit.done and isinstance(hit.error, KeyboardInterrupt)
    engine.run_until_idle()  # the engine goes on with the others when driven again
    assert other.result().output == bd.generate(model, b"one", max_new_bytes=20).output


def test_background_thread_misuse_is_refused_and_stop_finishes_live_requests():
    model = bd.random_model("tiny", 7)
    engine = Engine(model, max_batch=2).start()
    stream = engine.submit(b"hello", max_new_bytes=60)
    chunks = iter(stream)
    first = next(chunks)
    with pytest.raises(EngineError, match="stepped by its background thread"):
        engine.run_until_idle()
    engine.stop()  # the request holding a slot is finished by the thread that owns its greenlet
    assert stream.done and engine.live_requests == 0
    assert first + b"".join(chunks) == bd.generate(model, b"hello", max_new_bytes=60).output
    engine.submit(b"x", max_new_bytes=5)
    engine.step()  # stepped in the foreground now: it holds a slot in this thread
    with pytest.raises(EngineError, match="cannot start an engine"):
        engine.start()
    engine.run_until_idle()
    engine.start()
    assert engine.submit(b"y", max_new_bytes=5).result().output == bd.generate(model, b"y", max_new_bytes=5).output
    engine.stop()


def test_a_failing_background_thread_fails_every_request_instead_of_hanging(monkeypatch):
    model = bd.random_model("tiny", 7)
    engine = Engine(model, max_batch=1)

    def broken(*args, **kwargs):
        raise MemoryError("out of memory in the batched pass")

    streams = [engine.submit(b"a", max_new_bytes=10), engine.submit(b"b", max_new_bytes=10)]
    monkeypatch.setattr(engine, "_advance", broken)  # a failure outside any one request's strategy
    engine.start()
    for s in streams:
        with pytest.raises(EngineError, match="background thread failed: MemoryError"):
            s.result()
    assert not engine.running


def test_non_finite_rows_fail_alone():
    nan_model = bd.random_model("tiny")
    with torch.no_grad():
        nan_model.local_decoder.layers[0].attention.wq.weight.fill_(float("nan"))
    engine = Engine(nan_model, max_batch=2)
    streams = [engine.submit(b"a", max_new_bytes=4), engine.submit(b"b", max_new_bytes=4)]
    engine.run_until_idle()
    for s in streams:
        with pytest.raises(bd.NonFiniteError, match="local decoder"):
            s.result()


def test_cancel_frees_the_slot_and_others_finish():
    model = bd.random_model("tiny", 6)
    engine = Engine(model, max_batch=1)
    first = engine.submit(b"long one", max_new_bytes=200)
    waiting = engine.submit(b"short", max_new_bytes=10)
    for _ in range(5):
        engine.step()
    first.cancel()
    engine.run_until_idle()
    with pytest.raises(CancelledError):
        first.result()
    assert first.stats.stop_reason == "interrupted" and 0 < len(first.output) < 200
    assert waiting.result().output == bd.generate(model, b"short", max_new_bytes=10).output


def test_streaming_and_background_thread():
    model = bd.random_model("tiny", 7)
    with Engine(model, max_batch=4).start() as engine:
        streams = [engine.submit(f"p{i}".encode(), max_new_bytes=16) for i in range(6)]
        chunks = [list(s) for s in streams]
    for i, (s, c) in enumerate(zip(streams, chunks)):
        assert b"".join(c) == s.output == bd.generate(model, f"p{i}".encode(), max_new_bytes=16).output


def test_engine_statistics():
    model = bd.random_model("tiny", 8)
    engine = Engine(model, max_batch=4)
    streams = [engine.submit(f"q{i}".encode(), max_new_bytes=10) for i in range(8)]
    engine.run_until_idle()
    stats = engine.stats()
    assert stats.requests == 8 and stats.new_bytes == sum(len(s.output) for s in streams)
    assert 1.0 < stats.mean_live <= 4 and stats.rows_per_call["decoder"] > 1.0
    assert stats.stack_calls["decoder"] <= stats.steps
    assert stats.to_dict()["occupancy"] == pytest.approx(stats.mean_live / 4)


def test_grad_mode_is_left_as_it_was():
    model = bd.random_model("tiny", 9)
    assert torch.is_grad_enabled()
    bd.generate_many(model, [b"a", b"b", b"c"], strategy="blt-s", max_new_bytes=12, batch_size=2)
    assert torch.is_grad_enabled()


def test_tutorial_strategies_batch_unchanged():
    """The tutorial's third-party strategies, as written in docs/tutorial.md, decode batched as alone."""
    made = tutorial_strategies()
    with testing.registered_strategy(made["RepetitionPenalty"]), testing.registered_strategy(made["Lookup"]):
        model = bd.random_model("tiny", 10, dtype=torch.float64)
        reqs = [bd.Request(p, strategy="rep-penalty", options={"penalty": 2.0}, max_new_bytes=24)
                for p in (b"aaaa", b"def f():", b"")]
        reqs += [bd.Request(b"abcabcabc", strategy="lookup", options={"k": 4}, max_new_bytes=24),
                 bd.Request(b"mixed", strategy="blt-s", options={"k": 4}, max_new_bytes=24)]
        testing.assert_batched_equals_alone(model, reqs, batch_size=2)


def test_as_finished_yields_each_request_once_when_it_ends():
    model = bd.random_model("tiny", 10, dtype=torch.float64)
    engine = Engine(model, max_batch=2)
    sizes = {"long": 30, "short": 3, "middle": 12}
    tagged = [(tag, engine.submit_request(bd.Request(b"ab", max_new_bytes=n))) for tag, n in sizes.items()]
    seen: list[str] = []
    for finished in engine.as_finished(tagged):
        assert finished and all(stream.done for _, stream in finished)
        seen += [tag for tag, _ in finished]
    assert sorted(seen) == sorted(sizes) and seen.index("short") < seen.index("long")
    assert engine.idle
    for tag, stream in tagged:
        assert stream.output == bd.generate(model, b"ab", max_new_bytes=sizes[tag]).output


def test_listener_sees_every_chunk_then_the_end_and_cannot_break_the_engine():
    """``submit_request(..., listener=...)``: the hook a server's async bridge follows streams with."""
    model = bd.random_model("tiny", 10)
    seen: list[list[bytes | None]] = [[], []]
    done_when_told: list[bool] = []

    def listen(i):
        def listener(chunk):
            seen[i].append(chunk)
            if chunk is None:
                done_when_told.append(streams[i].done and streams[i].stats is not None)
        return listener

    def broken(chunk):
        raise RuntimeError("a consumer that went away")

    engine = Engine(model, max_batch=2)
    streams = [engine.submit_request(bd.Request(f"r{i}", max_new_bytes=12), listener=listen(i)) for i in range(2)]
    other = engine.submit_request(bd.Request("x", strategy="blt-s", max_new_bytes=12), listener=broken)
    engine.run_until_idle()
    for s, got in zip(streams, seen):
        assert got[-1] is None and None not in got[:-1] and b"".join(got[:-1]) == s.output
    assert done_when_told == [True, True]
    assert other.result().output == bd.generate(model, "x", strategy="blt-s", max_new_bytes=12).output


# -- admission: sizes checked up front, a failure to admit one request fails that request alone -----------
def _long_model(max_seqlen: int = 1 << 17):
    """The tiny random model allowed long sequences (its decode state grows with them)."""
    from blt_decode.model.presets import BLT_PRESETS

    return bd.random_model(attrs.evolve(BLT_PRESETS["tiny"], max_seqlen=max_seqlen))


def _ended(stream, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not stream.done:
        assert time.monotonic() < deadline, "the request never ended (the engine lost it)"
        time.sleep(0.02)


def test_sizes_are_checked_before_anything_is_queued():
    model = _long_model(1 << 20)
    with pytest.raises(EngineError, match=r"max_batch must be an integer in 1\.\.4096, got 5000"):
        Engine(model, max_batch=5000)
    with pytest.raises(EngineError, match="max_batch must be an integer in"):
        bd.generate_many(model, [b"a"], batch_size=10**9)
    engine = Engine(model, max_batch=4096)  # 4096 slots of 256 positions fit; a million positions each do not
    with pytest.raises(EngineError, match=r"decode state for 4096 slots x 1000192 positions would take .* GiB, more "
                                          r"than the .* GiB free on cpu; lower max_new_bytes or max_batch"):
        engine.submit(b"a", max_new_bytes=1_000_000)
    assert engine.idle and engine.state is None  # nothing queued, nothing allocated
    assert engine.submit(b"a", max_new_bytes=4).result().output == bd.generate(model, b"a", max_new_bytes=4).output


def test_a_request_that_cannot_be_admitted_fails_alone_and_the_engine_serves_on(caplog, address_space_limit):
    """Memory runs out while a request is admitted (its state passes the up-front check, then the real
    allocation fails: here an address-space limit, as a container's or a busy machine's would): that
    request fails with a clear, logged error; the engine's thread runs on, serving the others and later
    submits. It used to crash the engine's thread, lose the request being admitted (its waiter hung
    forever) and fail everything after."""
    model = _long_model()
    big_new_bytes = 33_000  # a state of 16 slots x 33024 positions: about 2 GiB
    available = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                     if line.startswith("MemAvailable:"))
    if available < 3 << 30:
        pytest.skip("needs 3 GiB of free memory for the up-front check to let the big request through")
    engine = Engine(model, max_batch=16).start()
    try:
        assert engine.submit(b"warm", max_new_bytes=4).result().output  # the first (small) state is allocated
        with caplog.at_level("ERROR", logger="blt_decode.engine.core"), address_space_limit(512 << 20):
            big = engine.submit(b"big", max_new_bytes=big_new_bytes)
            small = engine.submit(b"small", max_new_bytes=12)
            _ended(big)
            _ended(small)
        with pytest.raises(EngineError, match=r"could not admit the request \(33[0-9]+ positions, engine state 16 "
                                              r"slots\): RuntimeError: .*can't allocate memory"):
            big.result()
        assert small.result().output == bd.generate(model, b"small", max_new_bytes=12).output
        assert "could not admit the request" in caplog.text
        assert engine.running
        assert engine.submit(b"later", max_new_bytes=8).result().output == bd.generate(model, b"later", max_new_bytes=8).output
    finally:
        engine.stop()
