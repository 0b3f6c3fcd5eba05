"""The protocol and registry: hookspecs documented, entry points found, clear errors."""

import inspect
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import attrs
import pytest

import blt_decode as bd
from blt_decode import testing
from blt_decode.errors import DuplicateNameError, InvalidOptionsError, PluginError, UnknownBackendError, UnknownStrategyError
from blt_decode.plugins import hookspecs
from blt_decode.plugins import registry as plugins

DOCS = Path(__file__).resolve().parents[2] / "docs"


def hookspec_names():
    return [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("register_")]


def test_every_hookspec_has_a_docstring_and_a_section_in_docs():
    plugin_doc = (DOCS / "plugins.md").read_text()
    assert hookspec_names(), "no hookspecs found"
    for name in hookspec_names():
        fn = getattr(hookspecs, name)
        assert fn.__doc__ and len(fn.__doc__.strip()) > 40, f"{name} has no real docstring"
        assert re.search(rf"^#+ .*`{name}\(", plugin_doc, re.M), f"docs/plugins.md has no section for {name}"


def test_unknown_names_list_registered_ones():
    with pytest.raises(UnknownStrategyError) as err:
        bd.generate("random:tiny", "x", strategy="no-such-thing", max_new_bytes=1)
    assert isinstance(err.value, KeyError)
    assert "autoregressive" in str(err.value) and "no-such-thing" in str(err.value)
    with pytest.raises(UnknownBackendError, match="eager"):
        bd.generate("random:tiny", "x", backend="warp-drive", max_new_bytes=1)


def test_bad_options_say_which_and_why():
    with pytest.raises(InvalidOptionsError, match="temperature"):
        bd.generate("random:tiny", "x", temperature=-1.0, max_new_bytes=1)
    with pytest.raises(InvalidOptionsError, match=r"unknown option.*'beam_width'.*valid options: cache"):
        bd.generate("random:tiny", "x", beam_width=3, max_new_bytes=1)
    with pytest.raises(InvalidOptionsError, match="cache"):
        bd.generate("random:tiny", "x", cache="disk", max_new_bytes=1)


def test_aliases_resolve_to_the_same_strategy():
    assert plugins.get_strategy("ar") is plugins.get_strategy("autoregressive")
    assert "ar" not in bd.strategy_names()


@attrs.frozen
class _Opts:
    pass


class _Clash:
    name = "autoregressive"
    description = "clashes with the built-in"
    aliases = ()
    Options = _Opts

    def lookahead(self, options):
        return 0

    def decode(self, session, context, options):
        yield []


def test_duplicate_names_name_both_plugins():
    class ClashPlugin:
        @bd.hookimpl
        def register_strategies(self, register):
            register(_Clash())

    pm = plugins.get_plugin_manager()
    pm.register(ClashPlugin(), name="clash-plugin")
    plugins._strategies = None
    try:
        with pytest.raises(DuplicateNameError, match=r"blt_decode\.strategies\.autoregressive.*clash-plugin"):
            plugins.strategies()
    finally:
        plugins.reset()



class _SessionOnly:
    """A backend written against the old contract: it opens sessions itself and gives no runner."""

    name = "session-only"
    description = "builds its own sessions"

    def open_session(self, model, capacity):
        raise AssertionError("the framework builds sessions; this is never called")


class _BadWarmup:
    name = "bad-warmup"
    description = "a warm-up that is not callable"
    warmup = 3

    def runner(self, model):
        raise AssertionError("never called")


@pytest.mark.parametrize("backend,words", [
    (_SessionOnly(), r"is not a backend: it has no runner\. The contract: blt_decode\.decoding\.protocol\.Backend"),
    (_BadWarmup(), r"is not a backend: warmup is not callable"),
])
def test_the_registry_checks_the_backend_contract(backend, words):
    with testing.registered_backend(backend), pytest.raises(TypeError, match=words):
        plugins.backends()


def test_the_cli_says_a_broken_backend_as_one_line(capsys):
    """A plugin author's broken backend reaches the CLI as ``ContractError``: exit 2, one line, no traceback."""
    from blt_decode.cli import main

    with testing.registered_backend(_SessionOnly()):
        assert main(["backends"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("blt-decode: error: ") and "is not a backend: it has no runner" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert issubclass(bd.ContractError, TypeError) and issubclass(bd.ContractError, bd.BLTDecodeError)


def test_warm_up_times_the_backend_whatever_it_returns():
    backend = testing.RewritingBackend("quiet", "eager; a warm-up that returns nothing", lambda s, c, l: l)
    backend.warmup = lambda model, *, rows, progress: None
    seconds = plugins.warm_up(backend, bd.random_model("tiny", 0), rows=(2,))
    assert isinstance(seconds, float) and seconds >= 0.0


def test_the_framework_builds_sessions_and_warms_up_through_the_contract():
    from blt_decode.decoding.session import open_session

    model = bd.random_model("tiny", 0)
    calls = []

    class Counting(testing.RewritingBackend):
        def runner(self, model):
            calls.append("runner")
            return super().runner(model)

    backend = Counting("counting", "eager, counting its runners", lambda session, call, logits: logits)
    session = open_session(backend, model, 16)
    session.prefill([1, 70, 71])
    assert calls == ["runner"] and session.length == 3
    assert plugins.warm_up(backend, model, rows=(1, 4)) is None and not plugins.prepares(backend)
    backend.warmup = lambda model, *, rows, progress: calls.append(("warmup", rows, progress)) or 1e6
    assert plugins.prepares(backend) and plugins.warm_up(backend, model, rows=[4]) < 1e6  # timed, not what warmup returned
    assert calls[-1] == ("warmup", (4,), False)

PLUGIN_SOURCE = textwrap.dedent('''
    import attrs
    import blt_decode

    @attrs.frozen
    class Options:
        byte: int = attrs.field(default=65, validator=attrs.validators.and_(attrs.validators.ge(0), attrs.validators.le(255)))

    class Repeat:
        """Emits the same byte forever: the smallest possible third-party strategy."""
        name = "repeat"
        description = "emits one byte over and over"
        aliases = ()
        Options = Options

        def lookahead(self, options):
            return 0

        def decode(self, session, context, options):
            session.prefill(context.prompt_ids)  # touch the model the proper way
            while True:
                yield [options.byte + 4]

    @blt_decode.hookimpl
    def register_strategies(register):
        register(Repeat())
''')


@pytest.fixture
def third_party_plugin(tmp_path, installed_plugin):
    """A throwaway installed distribution that declares a strategy through the blt_decode entry point."""
    (tmp_path / "blt_repeat_plugin.py").write_text(PLUGIN_SOURCE)
    installed_plugin("blt-repeat-plugin", "repeat", "blt_repeat_plugin")
    return tmp_path


def test_third_party_strategy_from_entry_point(third_party_plugin):
    assert "repeat" in bd.strategy_names()
    g = bd.generate("random:tiny", "hi", strategy="repeat", max_new_bytes=5, byte=66)
    assert g.output == b"BBBBB"
    assert g.stats.passes.decoder == 1  # its single prefill


def test_third_party_strategy_from_the_cli(third_party_plugin):
    env_path = f"{third_party_plugin}"
    code = "import sys; sys.path.insert(0, %r); from blt_decode.cli import main; sys.exit(main(sys.argv[1:]))" % env_path
    out = subprocess.run(
        [sys.executable, "-c", code, "generate", "--model", "random:tiny", "--strategy", "repeat", "-o", "byte=67",
         "--max-new-bytes", "3", "hi"], capture_output=True, text=True, check=True,
    )
    assert out.stdout == "hiCCC\n"
    listing = subprocess.run([sys.executable, "-c", code, "strategies"], capture_output=True, text=True, check=True)
    assert "repeat" in listing.stdout and "emits one byte" in listing.stdout


def test_a_misspelled_hook_is_refused_with_one_clear_error(tmp_path, installed_plugin):
    """pluggy registers a hookimpl no hookspec declares without a word; the registry refuses it, naming
    the plugin, the hook and the hooks that exist, from Python and from the CLI (exit 2, one line)."""
    (tmp_path / "blt_typo_plugin.py").write_text(PLUGIN_SOURCE.replace("def register_strategies", "def register_strategy"))
    installed_plugin("blt-typo-plugin", "typo", "blt_typo_plugin")
    with pytest.raises(PluginError, match=r"plugin 'typo' implements hook 'register_strategy'.*register_backends, register_strategies"):
        bd.strategy_names()
    code = "import sys; sys.path.insert(0, %r); from blt_decode.cli import main; sys.exit(main(sys.argv[1:]))" % str(tmp_path)
    out = subprocess.run([sys.executable, "-c", code, "strategies"], capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "register_strategy'" in out.stderr


def test_layout_installs_no_generic_top_level_packages(tmp_path):
    # run outside the checkout, where only what was installed is importable
    code = (
        "import importlib.util, pathlib, blt_decode.strategies as s, blt_decode.backends as b;"
        "print(pathlib.Path(s.__file__).parent.name, pathlib.Path(b.__file__).parent.name,"
        " importlib.util.find_spec('strategies'), importlib.util.find_spec('backends'))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["strategies", "backends", "None", "None"]
