"""``blt-decode new-strategy NAME``: a ready plugin package for a new strategy (pyproject with the entry
point, the strategy written on :mod:`blt_decode.strategy`, tests using :mod:`blt_decode.testing`), which
installs with ``pip install -e ".[test]"`` and passes its tests as written.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from blt_decode.errors import CLIError
from blt_decode.plugins import registry as plugins

#: a strategy name users can type: lowercase letters, digits and single dashes, starting with a letter
NAME_PATTERN = re.compile(r"[a-z][a-z0-9]*(?:-[a-z0-9]+)*")
MAX_NAME = 40

PYPROJECT = '''\
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "{dist}"
version = "0.1.0"
description = "The {name} decoding strategy for blt-decode"
dependencies = ["blt-decode"]

[project.optional-dependencies]
test = ["pytest", "hypothesis"]

# this entry point is how blt-decode finds the strategy
[project.entry-points.blt_decode]
{module} = "{module}"

[tool.setuptools]
py-modules = ["{module}"]

[tool.pytest.ini_options]
testpaths = ["tests"]
'''

STRATEGY = '''\
"""The {name} decoding strategy (a blt-decode plugin). As written it is autoregressive decoding, greedy
or sampled; change ``decode`` (and the options) to make it yours. The contract: blt_decode.decoding.protocol;
what a strategy may use: blt-decode's docs/plugins.md."""

from typing import Iterator

import attrs

from blt_decode import strategy


@attrs.frozen
class Options(strategy.SamplingOptions):
    """``temperature``, ``top_k`` and ``top_p`` come from SamplingOptions; add fields with
    strategy.integer / number / choice / flag."""


class {cls}(strategy.BaseStrategy):
    """{name}: one byte per step, greedy or sampled (written by blt-decode new-strategy)"""

    name = "{name}"
    Options = Options

    def decode(self, session: strategy.DecodeSession, context: strategy.DecodeContext,
               options: Options) -> Iterator[list[int]]:
        sampler = options.sampler
        logits = session.prefill(context.prompt_ids)[-1]  # the next byte's logits after the prompt
        while True:
            token = sampler.sample(logits, context.generator)
            yield [token]  # commit it; blt-decode stops at EOS, stop sequences and max_new_bytes
            logits = session.append([token])[-1]


@strategy.hookimpl
def register_strategies(register):
    register({cls}())
'''

TESTS = '''\
from hypothesis import given, settings
from hypothesis import strategies as st

import blt_decode
from blt_decode import testing

NAME = "{name}"


def test_it_is_registered():
    assert NAME in blt_decode.strategy_names()


@settings(max_examples=8, deadline=None)
@given(model=testing.tiny_models(), prompt=testing.prompts(), n=st.integers(0, 24))
def test_greedy_output_is_autoregressive(model, prompt, n):
    # true of the strategy as written; keep it while yours is meant to be exactly greedy
    testing.assert_same_output(model, prompt, "autoregressive", NAME, max_new_bytes=n)


@settings(max_examples=4, deadline=None)
@given(model=testing.tiny_models(), prompts=st.lists(testing.prompts(), min_size=1, max_size=4),
       options=st.sampled_from([{{}}, {{"temperature": 0.8, "top_k": 8}}]))
def test_batched_decoding_equals_alone(model, prompts, options):
    requests = [blt_decode.Request(p, strategy=NAME, options=options, max_new_bytes=16) for p in prompts]
    testing.assert_batched_equals_alone(model, requests, batch_size=2)
'''

README = '''\
# {dist}

The `{name}` decoding strategy for blt-decode, as a plugin package.

    pip install -e ".[test]"
    python -m pytest
    blt-decode generate --model random:tiny --strategy {name} "def fib(n):"
'''


def check_name(name: str) -> str:
    """``name`` if it can be a new strategy's name, else :class:`CLIError` saying why."""
    if not NAME_PATTERN.fullmatch(name) or len(name) > MAX_NAME:
        raise CLIError(f"strategy name {name!r}: use lowercase letters, digits and single dashes, starting with a "
                       f"letter, at most {MAX_NAME} characters (e.g. my-strategy)")
    if name in plugins.strategies():
        raise CLIError(f"a strategy named {name!r} is already registered; choose another name")
    if importlib.util.find_spec(module_name(name)) is not None:  # "decode" would shadow blt_decode itself
        raise CLIError(f"a module named {module_name(name)} is already installed; choose another name")
    return name


def module_name(name: str) -> str:
    """The plugin's module: ``blt_`` + the name with dashes as underscores."""
    return "blt_" + name.replace("-", "_")


def new_strategy(name: str, directory: Path | None = None) -> Path:
    """Write the package of a new strategy ``name`` into ``directory`` (default: ``./blt-NAME``), which
    must not exist or be empty; returns the directory."""
    check_name(name)
    directory = Path(directory) if directory is not None else Path(f"blt-{name}")
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise CLIError(f"{directory} exists and is not an empty directory; give --dir a new one")
    module = module_name(name)
    fields = {"name": name, "dist": f"blt-{name}", "module": module,
              "cls": "".join(part.capitalize() for part in name.split("-"))}
    files = {"pyproject.toml": PYPROJECT, f"{module}.py": STRATEGY, f"tests/test_{module}.py": TESTS,
             "README.md": README}
    for relative, template in files.items():
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(template.format(**fields), encoding="utf-8")
    return directory
