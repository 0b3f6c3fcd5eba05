"""The public API's promises on bad and awkward input: typed one-line errors, stop sequences, seeds that
leave global random state alone, non-finite models, strategies that break the protocol, text streaming."""

import random

import attrs
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import blt_decode as bd
from blt_decode import testing
from blt_decode.decoding import options
from blt_decode.engine import driver as decoding
from blt_decode.errors import InvalidOptionsError, InvalidRequestError, NonFiniteError, StrategyError
from blt_decode.model import tokenizer
from blt_decode.plugins import registry as plugins


@pytest.fixture(scope="module")
def tiny():
    return bd.random_model("tiny")


# -- stop sequences ----------------------------------------------------------------------------------
def test_a_bare_str_or_bytes_is_one_stop_sequence(tiny):
    free = bd.generate(tiny, "ab", max_new_bytes=48).output
    stop = free[10:13]
    end = free.find(stop) + len(stop)
    for s in (stop, bytearray(stop), [stop], (stop,)):
        g = bd.generate(tiny, "ab", max_new_bytes=48, stop=s)
        assert g.output == free[:end] and g.stats.stop_reason == "stop_sequence"


def test_stop_str_is_not_split_into_characters(tiny):
    free = bd.generate(tiny, "ab", max_new_bytes=32).output
    ascii_char = next(chr(b) for b in free if b < 128)  # deterministic model: there is one
    for stop in (ascii_char + "\x00\x01", (ascii_char + "\x00\x01").encode()):
        g = bd.generate(tiny, "ab", max_new_bytes=32, stop=stop)
        assert g.output == free and g.stats.stop_reason == "max_new_bytes"


@pytest.mark.parametrize("stop", ["", b"", [b"ok", ""], 5, [b"x", 3], None])
def test_bad_stop_sequences_are_refused(tiny, stop):
    with pytest.raises(InvalidRequestError, match="stop"):
        bd.generate(tiny, "ab", max_new_bytes=4, stop=stop)


# -- seeds and global random state ---------------------------------------------------------------------
def test_generate_without_a_seed_leaves_global_random_state_alone(tiny):
    torch.manual_seed(1234)
    random.seed(99)
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    g = bd.generate(tiny, "ab", max_new_bytes=8, temperature=1.0)
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == py_state
    assert torch.initial_seed() == 1234
    again = bd.generate(tiny, "ab", max_new_bytes=8, temperature=1.0, seed=g.stats.seed)
    assert again.output == g.output  # the reported seed reproduces the sample


@pytest.mark.parametrize("seed", [-1, 2**64, True, 1.5, "3"])
def test_bad_seeds_are_refused(tiny, seed):
    with pytest.raises(InvalidRequestError, match="seed"):
        bd.generate(tiny, "ab", max_new_bytes=1, seed=seed)


def test_largest_seed_works(tiny):
    assert bd.generate(tiny, "ab", max_new_bytes=4, temperature=1.0, seed=2**64 - 1).stats.seed == 2**64 - 1


# -- request fields ----------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [-1, 1.5, "10", True, None])
def test_bad_max_new_bytes(tiny, value):
    with pytest.raises(InvalidRequestError, match="max_new_bytes"):
        bd.generate(tiny, "ab", max_new_bytes=value)


@pytest.mark.parametrize("prompt", [5, None, ["a"], "\ud800"])
def test_bad_prompts(tiny, prompt):
    with pytest.raises(InvalidRequestError, match="prompt"):
        bd.generate(tiny, prompt, max_new_bytes=1)


@pytest.mark.parametrize("strategy,opts,field", [
    ("blt-s", {"k": True}, "'k'"),
    ("blt-s", {"k": 2.0}, "'k'"),
    ("ar", {"temperature": float("inf")}, "temperature"),
    ("ar", {"temperature": float("nan")}, "temperature"),
    ("ar", {"top_k": False}, "top_k"),
    ("ar", {"top_p": 0.0}, "top_p"),
    ("ar", {"cache": None}, "cache"),
    ("blt-d", {"alpha": "high"}, "alpha"),
    ("blt-d", {"max_passes": True}, "max_passes"),
    ("blt-dv", {"block_size": 1}, "block_size"),
])
def test_bad_options_give_one_clean_line(tiny, strategy, opts, field):
    with pytest.raises(InvalidOptionsError) as err:
        bd.generate(tiny, "ab", strategy=strategy, max_new_bytes=1, **opts)
    message = str(err.value)
    assert field in message and "\n" not in message and "Attribute(" not in message


def test_third_party_attrs_validators_are_cleaned():
    @attrs.frozen
    class Opts:
        n: int = attrs.field(default=1, validator=attrs.validators.instance_of(int))

    class S:
        name, Options = "third-party", Opts

    with pytest.raises(InvalidOptionsError) as err:
        options.make_options(S, {"n": "x"})
    assert "Attribute(" not in str(err.value) and "'n'" in str(err.value)


# -- non-finite models ---------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["ar", "blt-s", "blt-d", "blt-dv"])
@pytest.mark.parametrize("module,name", [
    ("global_transformer", "global transformer"), ("local_decoder", "local decoder"),
    ("local_encoder", "local encoder"), ("entropy_model", "entropy model"),
])
def test_nan_weights_raise_naming_the_module(strategy, module, name):
    model = bd.random_model("tiny")
    with torch.no_grad():
        getattr(model, module).layers[0].attention.wq.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match=name):
        bd.generate(model, "hello", strategy=strategy, max_new_bytes=16)


# -- strategies that break the protocol ----------------------------------------------------------------
@attrs.frozen
class _NoOptions:
    pass


def _strategy(name, chunks):
    class Bad:
        description, aliases, Options = "test double", (), _NoOptions

        def lookahead(self, options):
            return 0

        def decode(self, session, context, options):
            session.prefill(context.prompt_ids)
            yield from chunks()

    Bad.name = name
    return Bad()


def _forever(chunk):
    def gen():
        while True:
            yield chunk
    return gen


@pytest.mark.parametrize("chunk,match", [
    (b"AB", "bytes hold byte values"),
    ("a", "must yield a list"),
    (None, "must yield a list"),
    (5.0, "must yield a list"),
    ([5.0], "int token ids"),
    ([True], "int token ids"),
    ([1], "allowed are byte ids"),
    ([300], "allowed are byte ids"),
    ([], "committed nothing"),
])
def test_bad_commits_name_the_strategy(tiny, chunk, match):
    name = "bad-committer"

    class Plugin:
        @bd.hookimpl
        def register_strategies(self, register):
            register(_strategy(name, _forever(chunk)))

    pm = plugins.get_plugin_manager()
    pm.register(Plugin(), name="bad-committer-plugin")
    plugins._strategies = None
    try:
        with pytest.raises(StrategyError, match=match) as err:
            bd.generate(tiny, "ab", strategy=name, max_new_bytes=8)
        assert name in str(err.value)
    finally:
        pm.unregister(name="bad-committer-plugin")
        plugins._strategies = None


def test_valid_int_like_ids_are_accepted():
    import numpy as np

    assert decoding.check_chunk("s", (np.int64(70), 71, tokenizer.EOS_ID)) == [70, 71, 2]


# -- streaming text and timing stats -------------------------------------------------------------------
def test_text_view_never_splits_a_character(tiny):
    chunks = ["é".encode()[:1], "é".encode()[1:] + b"a", "€".encode()[:2], "€".encode()[2:], b"\xff", b"z"]
    texts = list(decoding.utf8_text(chunks))
    assert texts == ["éa", "€", "\ufffd", "z"]
    s = bd.stream(tiny, "ab", max_new_bytes=40)
    assert "".join(s.text()) == tokenizer.display(s.output)


def test_stats_report_time_to_first_byte_and_decode_speed(tiny):
    g = bd.generate(tiny, "ab", max_new_bytes=32)
    s = g.stats
    assert 0 < s.time_to_first_byte_s <= s.wall_time_s
    assert s.decode_bytes_per_second > 0
    d = s.to_dict()
    assert d["time_to_first_byte_s"] == s.time_to_first_byte_s and "decode_bytes_per_second" in d
    empty = bd.generate(tiny, "ab", max_new_bytes=0).stats
    assert empty.time_to_first_byte_s is None and empty.decode_bytes_per_second is None


def test_load_model_never_converts_a_model_in_place(tiny):
    before = tiny.dtype
    converted = bd.load_model(tiny, dtype=torch.float64)
    assert converted.dtype == torch.float64 and tiny.dtype == before


@pytest.mark.parametrize("device", ["gpu", "cuda:99" if not torch.cuda.is_available() else "cuda:999"])
def test_bad_devices(device):
    with pytest.raises(InvalidRequestError, match="device"):
        bd.load_model("random:tiny", device=device)


def test_a_broken_default_model_says_what_is_wrong(monkeypatch, tmp_path):
    from blt_decode.checkpoints import resolve as loading
    from blt_decode.errors import CheckpointError

    bd.save_model(bd.random_model("tiny"), tmp_path)
    (tmp_path / "config.json").write_text('{"format": "blt-decode", "version": 1, "config": {"encoder": null}}')
    monkeypatch.setattr(loading, "DEFAULT_MODEL_DIR", tmp_path)
    with pytest.raises(CheckpointError, match="config.json: missing config field"):
        bd.load_model("default")
    monkeypatch.setattr(loading, "DEFAULT_MODEL_DIR", tmp_path / "absent")
    with pytest.raises(bd.UnknownModelError, match="no trained default model"):
        bd.load_model("default")


# -- what a call may ask for -----------------------------------------------------------------------------
def test_generate_many_refuses_a_bare_prompt_and_call_level_arguments_beside_requests(tiny):
    """A str is one prompt, not a list of one-byte prompts; call-level decoding arguments would apply
    to the plain prompts and not to Requests, so giving both is an error (and nothing is decoded)."""
    for bare in ("abc", b"abc"):
        with pytest.raises(InvalidRequestError, match=r"prompts must be a list of prompts, got one .*write \[prompt\]"):
            bd.generate_many(tiny, bare)
    requests = [bd.Request("a", max_new_bytes=4), "b"]
    for kwargs, named in (({"max_new_bytes": 40}, "max_new_bytes"), ({"strategy": "blt-s"}, "strategy"),
                          ({"temperature": 0.5}, "temperature"), ({"seed": 3, "stop": "x"}, "seed, stop")):
        with pytest.raises(InvalidRequestError, match=f"call-level {named}"):
            bd.generate_many(tiny, requests, **kwargs)
    # plain prompts take the call's arguments; Requests keep their own; both mix without call-level ones
    plain = bd.generate_many(tiny, ["a", "b"], max_new_bytes=6, strategy="blt-s", k=2)
    assert [g.output for g in plain] == [bd.generate(tiny, p, max_new_bytes=6, strategy="blt-s", k=2).output for p in "ab"]
    mixed = bd.generate_many(tiny, requests)
    assert [len(g.output) for g in mixed] == [4, len(bd.generate(tiny, "b").output)]


@pytest.mark.parametrize("call", [
    lambda m: bd.generate(m, "a", max_new_bytes=4, trace="yes"),
    lambda m: bd.stream(m, "a", max_new_bytes=4, trace=1),
    lambda m: bd.Engine(m).submit("a", max_new_bytes=4, trace="no"),
    lambda m: bd.generate_many(m, ["a"], max_new_bytes=4, progress="yes"),
])
def test_flags_must_be_booleans(tiny, call):
    with pytest.raises(InvalidRequestError, match="must be True or False, got"):
        call(tiny)


def test_an_option_given_twice_is_refused_not_overwritten():
    """`-o k=4 -o k=8` (and bench's `blt-s:k=4+k=8`) silently took the last value; the server refuses the
    same conflict (temperature in the body and in strategy_options)."""
    strategy = plugins.get_strategy("blt-s")
    with pytest.raises(InvalidOptionsError, match=r"option 'k' of strategy 'blt-s' is given twice \('k=4', 'k=8'\)"):
        options.parse_option_strings(strategy, ["k=4", "temperature=0.5", "k=8"])
    assert options.parse_option_strings(strategy, ["k=4", "temperature=0.5"]) == {"k": 4, "temperature": 0.5}


@pytest.mark.parametrize("field,value,words", [
    ("n_layers", 100_000, "n_layers must be an integer in 0..1024, got 100000"),
    ("dim", 10**7, "dim must be an integer in 1..65536"),
    ("ffn_dim", 10**9, "ffn_dim must be an integer in 1..262144"),
])
def test_model_config_sizes_have_upper_bounds(field, value, words):
    from blt_decode.errors import ConfigError
    from blt_decode.model.config import TransformerConfig

    fields = {"dim": 64, "n_layers": 2, "n_heads": 4, "ffn_dim": 128, field: value}
    with pytest.raises(ConfigError, match=words):
        TransformerConfig(**fields)


def test_max_seqlen_has_an_upper_bound_in_every_layout():
    from blt_decode.errors import ConfigError
    from blt_decode.model.config import BLTConfig
    from blt_decode.model.presets import BLT_PRESETS

    data = BLT_PRESETS["tiny"].to_dict()
    with pytest.raises(ConfigError, match=r"max_seqlen must be an integer in 1\.\.1048576, got 1000000000000"):
        BLTConfig.from_dict({**data, "max_seqlen": 10**12})
    with pytest.raises(ConfigError, match=r"encoder_hash_byte_group_size must be a list of integers in 1\.\.64 \(at most 64 of them\)"):
        BLTConfig.from_dict({**data, "encoder_hash_byte_group_size": [3, 100000]})


def test_greedy_runs_report_no_seed_and_sampled_runs_the_seed_they_used(tiny):
    """A seed is reported only when the decoding drew random numbers with it (a greedy run used to
    report a random one, as if it mattered)."""
    for strategy, opts in (("autoregressive", {}), ("blt-s", {"k": 4}), ("blt-d", {"block_size": 4}), ("blt-dv", {})):
        assert bd.generate(tiny, "ab", strategy=strategy, max_new_bytes=12, **opts).stats.seed is None, strategy
        assert bd.generate(tiny, "ab", strategy=strategy, max_new_bytes=12, seed=5, **opts).stats.seed is None, strategy
    drawn = bd.generate(tiny, "ab", max_new_bytes=12, temperature=0.9).stats.seed
    assert drawn is not None
    again = bd.generate(tiny, "ab", max_new_bytes=12, temperature=0.9, seed=drawn)
    assert again.stats.seed == drawn and again.output == bd.generate(tiny, "ab", max_new_bytes=12, temperature=0.9, seed=drawn).output
    assert bd.generate(tiny, "ab", strategy="blt-s", max_new_bytes=12, temperature=0.9, seed=7).stats.seed == 7


@given(model=testing.tiny_models(), prompt=testing.prompts(max_size=12), n=st.integers(0, 30), sampled=st.booleans())
def test_the_autoregressive_reference_counts_what_ar_does(model, prompt, n, sampled):
    """stats.autoregressive_passes (what `generate`'s summary compares with) predicts AR's passes exactly,
    for entropy and static patching, greedy and sampled, whatever ends the output; BLT-S greedy commits
    AR's bytes, so its reference is the AR run's passes."""
    from blt_decode.decoding.stats import autoregressive_passes

    opts = {"temperature": 1.0, "seed": 2} if sampled else {}
    ar = bd.generate(model, prompt, max_new_bytes=n, **opts)
    assert autoregressive_passes(model, prompt, ar.output, ar.stats.new_tokens) == ar.stats.passes
    if not sampled:
        spec = bd.generate(model, prompt, strategy="blt-s", k=4, max_new_bytes=n)
        assert spec.output == ar.output
        assert autoregressive_passes(model, prompt, spec.output, spec.stats.new_tokens) == ar.stats.passes


def test_passes_are_read_by_stack(tiny):
    # blt_decode.Stack keys every per-stack record: a pass count read by stack is the field of that stack
    stats = bd.generate(tiny, "read by stack", strategy="blt-s", k=3, max_new_bytes=16).stats
    assert [s.value for s in bd.Stack] == ["patcher", "encoder", "global", "decoder"]
    assert [stats.passes[s] for s in bd.Stack] == [stats.passes.patcher, stats.passes.encoder,
                                                   stats.passes.global_, stats.passes.decoder]
    assert dict(stats.params.items()) == {s: getattr(stats.params, s.attr) for s in bd.Stack}
    assert stats.passes.global_ < stats.passes.decoder  # the global model runs once per patch, not per byte
