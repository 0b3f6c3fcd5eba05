"""The strategy author's kit: one import (blt_decode.strategy), a base class with defaults, shared
sampling options, the contract stated once (blt_decode.decoding.protocol), every primitive documented, a session
sized from the request's own lookahead, and `blt-decode new-strategy`."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import attrs
import pytest
import torch

import blt_decode as bd
from blt_decode import cli, strategy, testing
from blt_decode.decoding import protocol
from blt_decode.decoding.session import DecodeSession
from blt_decode.engine.core import Engine
from blt_decode.errors import InvalidOptionsError, StrategyError
from blt_decode.plugins import hookspecs
from blt_decode.plugins import registry as plugins

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


# -- one import --------------------------------------------------------------------------------------
def test_the_built_in_strategies_import_only_the_author_module():
    for path in sorted((ROOT / "strategies").glob("*.py")):
        tree = ast.parse(path.read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        imported |= {f"blt_decode.{alias.name}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                     and node.module == "blt_decode" for alias in node.names}
        ours = {m for m in imported if m.startswith("blt_decode")} - {"blt_decode"}
        assert ours <= {"blt_decode.strategy"}, f"{path.name} imports {sorted(ours)}"


def test_every_exported_name_exists():
    missing = [name for name in strategy.__all__ if not hasattr(strategy, name)]
    assert not missing and len(set(strategy.__all__)) == len(strategy.__all__)


# -- the base class ----------------------------------------------------------------------------------
class _Echo(strategy.BaseStrategy):
    """repeats the prompt's last byte

    (only the first paragraph is the description)"""

    name = "echo-last"

    def decode(self, session, context, options):
        session.prefill(context.prompt_ids)
        while True:
            yield [context.prompt_ids[-1]]


def test_a_base_strategy_needs_only_a_name_a_docstring_and_decode():
    echo = _Echo()
    assert echo.description == "repeats the prompt's last byte"
    assert echo.aliases == () and echo.lookahead(strategy.NoOptions()) == 0 and attrs.fields(echo.Options) == ()
    with testing.registered_strategy(echo) as name:
        g = bd.generate("random:tiny", "xyz", strategy=name, max_new_bytes=4)
        assert g.output == b"zzzz"
        with pytest.raises(InvalidOptionsError, match=r"unknown option.*'k'.*valid options: \(none\)"):
            bd.generate("random:tiny", "xyz", strategy=name, k=3)


def test_an_explicit_description_wins_and_a_subclass_gets_its_own():
    class Plain(strategy.BaseStrategy):
        """from the docstring"""

        name = "plain"
        description = "stated"

    class Child(Plain):
        """the child's"""

    assert Plain.description == "stated" and Child.description == "the child's"


@pytest.mark.parametrize("make,words", [
    (lambda: type("NoDoc", (strategy.BaseStrategy,), {"name": "no-doc", "decode": lambda s, *a: iter(())})(),
     r"it has no description\. The contract: blt_decode\.decoding\.protocol\.Strategy"),
    (lambda: type("NoDecode", (strategy.BaseStrategy,), {"name": "no-decode", "__doc__": "d"})(), "it has no decode"),
    (lambda: type("Plain", (), {"name": "p", "description": "d", "aliases": (), "Options": dict,
                                "lookahead": lambda s, o: 0, "decode": lambda s, *a: iter(())})(),
     "Options must be an attrs class"),
    (lambda: type("Alias", (strategy.BaseStrategy,), {"name": "a", "__doc__": "d", "aliases": "ar2",
                                                      "decode": lambda s, *a: iter(())})(),
     "aliases must be a tuple of names"),
])
def test_the_registry_names_what_a_strategy_lacks_and_where_the_contract_is(make, words):
    with testing.registered_strategy(make()), pytest.raises(TypeError, match=words):
        plugins.strategies()


# -- shared sampling options -------------------------------------------------------------------------
def test_sampling_strategies_share_one_set_of_sampling_options():
    for name in ("autoregressive", "blt-s", "blt-dv"):
        options = plugins.get_strategy(name).Options
        assert issubclass(options, strategy.SamplingOptions), name
        with pytest.raises(InvalidOptionsError, match=rf"strategy {name!r}: option 'top_p' must be a number in \(0, 1\]"):
            bd.generate("random:tiny", "x", strategy=name, top_p=1.5, max_new_bytes=1)
    sampled = plugins.get_strategy("blt-s").Options(temperature=0.7, top_k=5, top_p=0.9, k=4)
    assert sampled.sampler == strategy.Sampler(0.7, 5, 0.9)


def test_sampler_sample_is_sample_id():
    logits = torch.randn(260, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for sampler in (strategy.Sampler(), strategy.Sampler(0.8, 20, 0.9)):
        a = sampler.sample(logits, torch.Generator().manual_seed(3))
        b = strategy.sample_id(logits, temperature=sampler.temperature, top_k=sampler.top_k, top_p=sampler.top_p,
                               generator=torch.Generator().manual_seed(3))
        assert a == b


# -- the contract, stated once -----------------------------------------------------------------------
def test_the_hook_specifications_and_the_docs_point_to_the_protocol():
    for name in ("register_strategies", "register_backends"):
        assert "blt_decode.decoding.protocol." in getattr(hookspecs, name).__doc__
    for page in ("plugins.md", "tutorial.md"):
        assert "blt_decode.decoding.protocol" in (DOCS / page).read_text(), page


def test_the_docs_table_of_strategy_members_is_the_protocol():
    text = (DOCS / "plugins.md").read_text()
    table = text.split("## A strategy\n", 1)[1].lstrip("\n").split("\n\n", 1)[0]
    documented = re.findall(r"^\| `(\w+)", table, re.M)
    attributes, methods = plugins._contract(protocol.Strategy)
    assert sorted(documented) == sorted(attributes + methods)


#: DecodeSession members the framework uses, which a strategy does not need
_FRAMEWORK_ONLY = {"model", "state", "slot", "executor", "capacity", "strategy_name", "ids", "move_to"}


def test_plugins_page_documents_every_primitive_state_and_author_name():
    text = (DOCS / "plugins.md").read_text()
    public = {n for n, v in vars(DecodeSession).items() if not n.startswith("_")}
    public |= {"length", "starts", "entropies", "stats", "trace"}  # set in __init__
    undocumented = sorted(n for n in public - _FRAMEWORK_ONLY if f"`{n}" not in text)
    assert not undocumented, f"docs/plugins.md does not document session members {undocumented}"
    undocumented = sorted(n for n in strategy.__all__ if f"`{n}" not in text)
    assert not undocumented, f"docs/plugins.md does not document blt_decode.strategy names {undocumented}"


# -- the session is sized from the request -----------------------------------------------------------
@attrs.frozen
class _RoomOptions:
    room: int = strategy.integer(1000, minimum=0, maximum=10**9)
    bad: str = strategy.choice("none", ("none", "negative", "text"))


class _WideScratch(strategy.BaseStrategy):
    """greedy, but writes a block of ``room`` [MASK]s after the sequence first (scratch it needs room for)"""

    name = "wide-scratch"
    Options = _RoomOptions

    def lookahead(self, options):
        return {"none": options.room, "negative": -1, "text": "lots"}[options.bad]

    def decode(self, session, context, options):
        logits = session.prefill(context.prompt_ids)[-1]
        if options.room:
            session.denoise([strategy.MASK_ID] * options.room)
        while True:
            token = strategy.greedy_id(logits)
            yield [token]
            logits = session.append([token])[-1]


def test_the_engine_gives_a_strategy_the_room_its_lookahead_asks_for():
    """The engine's slots were capped at max_seqlen + 130 (the built-in strategies' largest room): a
    strategy with a larger lookahead was refused by a default engine."""
    model = bd.random_model("tiny", 3)
    prompt = b"ab" * 100
    with testing.registered_strategy(_WideScratch()) as name:
        # 1 + 200 + 8 + 2048 + 1 positions: more than max_seqlen + 130
        request = bd.Request(prompt, strategy=name, options={"room": model.config.max_seqlen}, max_new_bytes=8)
        (batched,) = testing.assert_batched_equals_alone(model, [request], batch_size=2)
        assert batched.output == bd.generate(model, prompt, max_new_bytes=8).output
        with pytest.raises(bd.EngineError, match="this engine allows 64"):
            Engine(model, max_capacity=64).submit_request(request)


@pytest.mark.parametrize("bad,shown", [("negative", "-1"), ("text", "'lots'")])
def test_a_lookahead_that_is_not_a_size_is_a_strategy_error(bad, shown):
    with testing.registered_strategy(_WideScratch()) as name:
        with pytest.raises(StrategyError, match=rf"strategy 'wide-scratch': lookahead\(options\) returned {shown}"):
            bd.generate("random:tiny", "x", strategy=name, bad=bad, max_new_bytes=1)
        with pytest.raises(StrategyError, match="must be an integer in 0..65536"):
            bd.generate("random:tiny", "x", strategy=name, room=65537, max_new_bytes=1)


# -- blt-decode new-strategy -------------------------------------------------------------------------
def test_a_new_strategy_package_installs_and_passes_its_own_tests(tmp_path, user_venv):
    package = tmp_path / "pkg"
    assert cli.main(["new-strategy", "my-thing", "--dir", str(package)]) == 0
    user_venv.install(package)
    listing = user_venv.run(["blt-decode", "strategies"], tmp_path)  # outside the package: found installed
    assert re.search(r"^my-thing\s+my-thing: one byte per step", listing, re.M), listing
    out = user_venv.run(["blt-decode", "generate", "--model", "random:tiny", "--strategy", "my-thing",
                         "--max-new-bytes", "12", "--json", "def f("], tmp_path)
    assert bytes.fromhex(json.loads(out)["output_bytes_hex"]) == bd.generate("random:tiny", "def f(", max_new_bytes=12).output
    tests = user_venv.run([str(user_venv.python), "-m", "pytest", "-q", "-p", "no:cacheprovider"], package)
    assert re.search(r"\b3 passed\b", tests), tests[-3000:]


@pytest.mark.parametrize("name,words", [
    ("ar", "already registered"), ("Bad_Name", "lowercase letters"), ("decode", "module named blt_decode"),
    ("x" * 41, "at most 40"), ("1x", "starting with a letter"), ("a--b", "single dashes"),
])
def test_new_strategy_refuses_a_bad_name_and_writes_nothing(tmp_path, capsys, name, words):
    target = tmp_path / "pkg"
    assert cli.main(["new-strategy", name, "--dir", str(target)]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1 and not target.exists()


def test_new_strategy_refuses_a_directory_that_holds_files(tmp_path, capsys):
    (tmp_path / "README").write_text("mine")
    assert cli.main(["new-strategy", "my-thing", "--dir", str(tmp_path)]) == 2
    assert "is not an empty directory" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README"]
