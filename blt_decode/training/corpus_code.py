"""A code corpus built offline from the Python sources of the installed distributions (site-packages):
``blt-decode corpus build code --out DIR``. Its rules: docs/training.md ("On your data")."""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import importlib.metadata as metadata
import io
import json
import re
import shutil
import sys
import time
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Sequence

import attrs

from blt_decode.checks import describe_integer, describe_number, finite_in_range, is_int, show, to_float
from blt_decode.errors import CorpusError
from blt_decode.training.data import MANIFEST, SITE_CODE_KIND

CODE_CORPUS_VERSION = "blt-code-v1"
#: the most text ``max_bytes`` may ask for (1 TiB: far beyond the Python sources of any installation, which
#: are a few GB at most) and the largest shard (1 GiB: a shard is compressed in memory)
MAX_CORPUS_BYTES = 1 << 40
MAX_SHARD_BYTES = 1 << 30
#: SPDX identifiers treated as permissive (no copyleft, no field-of-use restriction)
PERMISSIVE = frozenset({
    "MIT", "MIT-0", "MIT-CMU", "X11", "BSD-2-CLAUSE", "BSD-3-CLAUSE", "BSD-3-CLAUSE-CLEAR", "0BSD", "BSD",
    "APACHE-2.0", "ISC", "PSF-2.0", "PYTHON-2.0", "CNRI-PYTHON", "ZLIB", "UNLICENSE", "CC0-1.0", "HPND",
    "BSL-1.0", "NCSA", "UPL-1.0", "PSF",
})
#: classifier (after "License :: OSI Approved :: " or "License :: ") -> SPDX-like id
_CLASSIFIERS = {
    "MIT License": "MIT", "BSD License": "BSD", "Apache Software License": "APACHE-2.0",
    "Python Software Foundation License": "PSF", "ISC License (ISCL)": "ISC", "zlib/libpng License": "ZLIB",
    "The Unlicense (Unlicense)": "UNLICENSE", "MIT No Attribution License (MIT-0)": "MIT-0",
    "Historical Permission Notice and Disclaimer (HPND)": "HPND", "Boost Software License 1.0 (BSL-1.0)": "BSL-1.0",
    "CC0 1.0 Universal (CC0 1.0) Public Domain Dedication": "CC0-1.0", "Public Domain": "CC0-1.0",
    "Universal Permissive License (UPL)": "UPL-1.0",
}
#: licence names in a free-text ``License`` field (a name, a sentence, or the whole licence text) ->
#: (SPDX-like id, permissive?). Every match counts: the field is accepted only when it names at least one
#: licence and every licence it names is permissive ("MIT or GPL" names GPL).
_FREE_TEXT = (
    (re.compile(r"\bMIT\b|Permission is hereby granted, free of charge", re.I), "MIT", True),
    (re.compile(r"\bBSD\b|Redistribution and use in source and binary forms", re.I), "BSD", True),
    (re.compile(r"\bApache\b", re.I), "APACHE-2.0", True),
    (re.compile(r"\bISC\b|Permission to use, copy, modify, and(/or)? distribute this software for any", re.I),
     "ISC", True),
    (re.compile(r"\bPSF\b|Python Software Foundation", re.I), "PSF", True),
    (re.compile(r"\bzlib\b", re.I), "ZLIB", True),
    (re.compile(r"\bUnlicense\b", re.I), "UNLICENSE", True),
    (re.compile(r"\bCC0\b", re.I), "CC0-1.0", True),
    (re.compile(r"\bBoost Software License\b|\bBSL-1\.0\b", re.I), "BSL-1.0", True),
    (re.compile(r"GPL|\bGNU\b|General Public License", re.I), "GPL", False),
    (re.compile(r"\bMPL\b|Mozilla Public", re.I), "MPL", False),
    (re.compile(r"\bEPL\b|Eclipse Public", re.I), "EPL", False),
    (re.compile(r"\bCDDL\b|\bEUPL\b|\bOSL\b|\bSSPL\b|Server Side Public|Artistic License|Commons Clause|"
                r"Business Source License|\bBUSL\b|ShareAlike|NonCommercial|non-commercial|proprietary", re.I),
     "OTHER", False),
)
#: what setuptools writes into ``License`` when nothing was declared: no declaration, not a licence text
_NO_DECLARATION = frozenset({"", "UNKNOWN", "NONE"})
#: a classifier that names no licence ("License :: OSI Approved" alone says only that there is one)
_NAMELESS_CLASSIFIERS = frozenset({"OSI Approved"})
#: directories holding other projects' code (``pip/_vendor``, ``ray/.../thirdparty_files``): it comes
#: under those projects' licences, not the distribution's, and often is a copy of another distribution
#: (pip vendors Pygments), so it is skipped
_VENDORED = re.compile(r"^_?(vendor|vendored|third_?party|third_?party_files)$", re.I)
#: distributions that are not "code no one here wrote"
EXCLUDED = frozenset({"blt-decode"})


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@attrs.frozen
class Licence:
    """What a distribution's metadata says about its licence."""

    ids: tuple[str, ...]  #: SPDX-like ids found (upper case)
    permissive: bool
    source: str  #: where it was read: License-Expression, License, Classifier, or none
    text: str  #: the declaration, shortened, for the manifest
    #: why it is not accepted (empty when permissive): the reason listed with the skipped distribution
    reason: str = ""


class _Malformed(ValueError):
    """Not an SPDX expression (unbalanced parentheses, a missing operator or operand)."""


def _spdx(expression: str) -> tuple[bool, tuple[str, ...]]:
    """(permissive?, ids) of an SPDX license expression, parsed with its grammar: parentheses group,
    ``WITH`` binds tightest, then ``AND``, then ``OR`` ("A AND (B OR C)" needs A and one of B, C).
    ``A OR B`` is permissive when one alternative is, ``A AND B`` when both are; ``A WITH exception`` is
    judged as A (the exceptions used in practice, e.g. LLVM-exception, only grant more); an id outside
    :data:`PERMISSIVE` (copyleft, ``LicenseRef-...``, unknown) is not. Raises :class:`_Malformed`."""
    tokens = re.findall(r"\(|\)|[^\s()]+", expression)
    ids: list[str] = []
    position = 0

    def peek() -> str | None:
        return tokens[position].upper() if position < len(tokens) else None

    def take() -> str:
        nonlocal position
        if position >= len(tokens):
            raise _Malformed("the expression ends early")
        position += 1
        return tokens[position - 1]

    def disjunction() -> bool:
        value = conjunction()
        while peek() == "OR":
            take()
            value = conjunction() or value  # both sides parsed: every id is collected
        return value

    def conjunction() -> bool:
        value = operand()
        while peek() == "AND":
            take()
            value = operand() and value
        return value

    def operand() -> bool:
        token = take()
        if token == "(":
            value = disjunction()
            if take() != ")":
                raise _Malformed("unbalanced parentheses")
        elif token == ")" or token.upper() in ("AND", "OR", "WITH"):
            raise _Malformed(f"{token!r} where a licence id belongs")
        else:
            licence = token.upper().removesuffix("+")
            ids.append(licence)
            value = licence in PERMISSIVE
        if peek() == "WITH":
            take()
            exception = take()
            if exception in ("(", ")") or exception.upper() in ("AND", "OR", "WITH"):
                raise _Malformed("WITH without an exception id")
        return value

    if not tokens:
        raise _Malformed("empty")
    result = disjunction()
    if position != len(tokens):
        raise _Malformed(f"{tokens[position]!r} after a complete expression")
    return result, tuple(ids)


def _expression_permissive(expression: str) -> tuple[bool, tuple[str, ...]]:
    """:func:`_spdx`, with a malformed expression not permissive (it cannot be judged)."""
    try:
        return _spdx(expression)
    except _Malformed:
        return False, ()


def _free_text(field: str) -> tuple[bool, tuple[str, ...]] | None:
    """(permissive?, ids) of a free-form ``License`` field, judged by every licence it names: the ids of
    an SPDX-looking field ("MIT", "MIT OR Apache-2.0", "GPLv2"), else the names :data:`_FREE_TEXT` finds
    in it; None when it names none (unrecognised text is never taken for a permissive licence). Unlike
    ``License-Expression``, an "or" here is not trusted to be a choice: "MIT or GPL" is refused."""
    try:
        _, ids = _spdx(field)
        return all(i in PERMISSIVE for i in ids), ids
    except _Malformed:
        pass
    named = [(spdx, ok) for pattern, spdx, ok in _FREE_TEXT if pattern.search(field)]
    if not named:
        return None
    return all(ok for _, ok in named), tuple(dict.fromkeys(spdx for spdx, _ in named))


def read_licence(meta: "metadata.PackageMetadata") -> Licence:
    """Classify a distribution's licence from its metadata (conservative: unknown is not permissive)."""
    expression = (meta.get("License-Expression") or "").strip()
    if expression:
        try:
            ok, ids = _spdx(expression)
        except _Malformed as exc:
            return Licence((), False, "License-Expression", expression[:120], f"not a valid SPDX expression ({exc})")
        return Licence(ids, ok, "License-Expression", expression[:120], "" if ok else "not a permissive licence")
    field = (meta.get("License") or "").strip()
    # the manifest shows the first line that says something (licence texts may open with a rule of "=")
    first_line = next((line.strip()[:120] for line in field.splitlines() if re.search(r"\w", line)), "")
    evidence: list[str] = []
    sources = []
    permissive = True
    if field.upper() not in _NO_DECLARATION:
        judged = _free_text(field)
        if judged is None:
            return Licence((), False, "License", first_line, "unrecognised License text (names no known licence)")
        ok, ids = judged
        evidence += ids
        permissive &= ok
        sources.append("License")
    for classifier in meta.get_all("Classifier") or []:
        if classifier.startswith("License ::"):
            name = classifier.split("::")[-1].strip()
            if name in _NAMELESS_CLASSIFIERS:
                continue
            spdx = _CLASSIFIERS.get(name, name.upper())
            evidence.append(spdx)
            permissive &= spdx in PERMISSIVE
            sources.append("Classifier")
    if not evidence:
        return Licence((), False, "none", first_line, "no licence in the metadata")
    text = first_line or "; ".join(evidence)
    return Licence(tuple(evidence), permissive, "+".join(dict.fromkeys(sources)), text,
                   "" if permissive else "not a permissive licence")


@attrs.frozen
class BuildResult:
    """What :func:`build_code_corpus` wrote and found."""

    out_dir: str
    version: str
    train_bytes: int
    heldout_bytes: int
    train_files: int
    heldout_files: int
    distributions: tuple[str, ...]
    heldout_distributions: tuple[str, ...]
    skipped: tuple[dict, ...]  #: {"name", "version", "licence", "reason"} per skipped distribution
    duplicates: int
    seconds: float
    #: {"distribution", "version", "path", "files", "reason"} per directory left out of a distribution that
    #: is otherwise kept: vendored trees, and packages of a held-out distribution
    skipped_files: tuple[dict, ...] = ()


def _distributions(paths: Sequence[str] | None) -> list[metadata.Distribution]:
    found: dict[str, metadata.Distribution] = {}
    for dist in metadata.distributions(**({"path": list(paths)} if paths is not None else {})):
        name = dist.metadata.get("Name")
        if name and _norm(name) not in found:  # first on the path wins, as for imports
            found[_norm(name)] = dist
    return [found[k] for k in sorted(found)]


def _shards(records: Iterable[tuple[str, str]], out: Path, prefix: str, shard_bytes: int) -> list[dict]:
    shards: list[dict] = []
    buffer, size, docs = io.BytesIO(), 0, 0

    def flush() -> None:
        nonlocal buffer, size, docs
        if not docs:
            return
        name = f"{prefix}-{len(shards):05d}.jsonl.gz"
        data = gzip.compress(buffer.getvalue(), compresslevel=6, mtime=0)  # mtime 0: reproducible bytes
        (out / name).write_bytes(data)
        shards.append({"file": name, "split": prefix, "documents": docs, "text_bytes": size,
                       "compressed_bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        buffer, size, docs = io.BytesIO(), 0, 0

    for name, text in records:
        buffer.write(json.dumps({"name": name, "text": text}, ensure_ascii=False).encode("utf-8") + b"\n")
        size += len(text.encode("utf-8"))
        docs += 1
        if size >= shard_bytes:
            flush()
    flush()
    return shards


def _vendored_tree(rel: str) -> str | None:
    """The vendored directory ``rel`` lies in (``pip/_vendor``), or None."""
    parts = PurePosixPath(rel).parts
    for i, part in enumerate(parts[:-1]):
        if _VENDORED.match(part):
            return "/".join(parts[: i + 1])
    return None


def _module_path(rel: str) -> tuple[str, ...]:
    """The dotted module path of an installed file as a tuple: ``pygments/lexers/python.py`` ->
    ``("pygments", "lexers", "python")``; ``six.py`` -> ``("six",)``."""
    parts = PurePosixPath(rel).parts
    return parts[:-1] + (parts[-1].removesuffix(".py"),)


def _package_roots(modules: set[str]) -> set[tuple[str, ...]]:
    """The import roots a distribution owns: its top-level modules and regular packages (``pygments``),
    and for a namespace package shared by several distributions (``google/``, no ``__init__.py``) the
    sub-package it installs under it (``google.auth``)."""
    roots = set()
    for rel in modules:
        path = _module_path(rel)
        if len(path) == 1 or f"{path[0]}/__init__.py" in modules:
            roots.add(path[:1])
        else:
            roots.add(path[:2])
    return roots


def _drop_heldout_packages(kept: list[dict], held: set[str], skipped: list[dict],
                           skipped_files: list[dict]) -> list[dict]:
    """Training distributions without the files that belong to a held-out distribution's packages (a
    copy of ``pygments`` installed by another distribution would teach the held-out code). A training
    distribution left with no file is skipped."""
    roots = {root: d["name"] for d in kept if _norm(d["name"]) in held for root in _package_roots(d["modules"])}
    if not roots:
        return kept
    result = []
    for d in kept:
        if _norm(d["name"]) in held:
            result.append(d)
            continue
        files, dropped = [], {}
        for entry in d["files"]:
            path = _module_path(entry[3])
            root = next((path[:n] for n in (1, 2) if path[:n] in roots), None)
            if root is None:
                files.append(entry)
            else:
                dropped[root] = dropped.get(root, 0) + 1
        for root, count in sorted(dropped.items()):
            skipped_files.append({"distribution": d["name"], "version": d["version"], "path": "/".join(root),
                                  "files": count, "reason": f"a package of the held-out distribution {roots[root]}"})
        if not files:
            skipped.append({"name": d["name"], "version": d["version"], "licence": d["licence"],
                            "reason": "all its files belong to held-out distributions' packages"})
            continue
        result.append(dict(d, files=files, bytes=sum(f[2] for f in files)))
    return result


def _check_recipe(max_bytes: int | None, heldout_fraction: float, shard_bytes: int) -> None:
    """The sizes and the fraction, up front (before minutes of reading sources), each refused with the range
    it must be in: a fraction of 2 or nan would hold out everything or nothing, a shard of 0 bytes would
    write a file per document, and a negative max_bytes read one distribution and then said nothing useful."""
    if max_bytes is not None and (not is_int(max_bytes) or not 1 <= max_bytes <= MAX_CORPUS_BYTES):
        raise CorpusError(f"max_bytes (--max-bytes) must be {describe_integer(1, MAX_CORPUS_BYTES)} or unset, "
                          f"got {show(max_bytes)}")
    if not finite_in_range(to_float(heldout_fraction), 0, 1, high_open=True):
        raise CorpusError(f"heldout_fraction (--heldout-fraction) must be {describe_number(0, 1, high_open=True)}, "
                          f"got {show(heldout_fraction)}")
    if not is_int(shard_bytes) or not 1 <= shard_bytes <= MAX_SHARD_BYTES:
        raise CorpusError(f"shard_bytes must be {describe_integer(1, MAX_SHARD_BYTES)} (--shard-mb 1..."
                          f"{MAX_SHARD_BYTES >> 20}), got {show(shard_bytes)}")


def build_code_corpus(out_dir: str | Path, *, include: Sequence[str] = (), max_bytes: int | None = None,
                      heldout_fraction: float = 0.02, heldout: Sequence[str] = (), shard_bytes: int = 32 << 20,
                      paths: Sequence[str] | None = None, log: Callable[[str], None] = print) -> BuildResult:
    """Build the code corpus into ``out_dir`` (see docs/training.md, "The code corpus").

    ``include``: distribution-name patterns to keep (fnmatch, case-insensitive; default all);
    ``max_bytes``: stop once this much text is collected (distributions in name order, so a small, fixed
    subset for tests); ``heldout``: names to hold out instead of the hash rule; ``paths``: where to look
    for distributions (default ``sys.path``)."""
    _check_recipe(max_bytes, heldout_fraction, shard_bytes)
    started = time.perf_counter()
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise CorpusError(f"{out} exists and is not a corpus directory; give a new or empty --out")
    patterns = [p.lower() for p in include]
    kept: list[dict] = []
    skipped: list[dict] = []
    skipped_files: list[dict] = []
    seen: set[bytes] = set()
    duplicates = 0
    total = 0
    for dist in _distributions(paths):
        name, version = dist.metadata["Name"], dist.version
        if _norm(name) in EXCLUDED or (patterns and not any(fnmatch.fnmatch(_norm(name), _norm(p)) for p in patterns)):
            continue
        if max_bytes is not None and total >= max_bytes:
            break
        licence = read_licence(dist.metadata)
        if not licence.permissive:
            skipped.append({"name": name, "version": version, "licence": licence.text, "reason": licence.reason})
            continue
        files = []
        modules: set[str] = set()  # every .py the distribution installs (empty ones too): its package layout
        vendored: dict[str, int] = {}
        for entry in sorted(dist.files or [], key=str):
            rel = str(entry)
            if not rel.endswith(".py") or ".." in Path(rel).parts:
                continue
            tree = _vendored_tree(rel)
            if tree is not None:
                vendored[tree] = vendored.get(tree, 0) + 1
                continue
            modules.add(PurePosixPath(rel).as_posix())
            path = Path(str(dist.locate_file(entry)))
            try:
                data = path.read_bytes()
                text = data.decode("utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            if not data.strip():
                continue
            digest = hashlib.sha256(data).digest()
            if digest in seen:
                duplicates += 1
                continue
            seen.add(digest)
            files.append((f"{name}/{rel}", text, len(data), PurePosixPath(rel).as_posix()))
            total += len(data)
            if max_bytes is not None and total >= max_bytes:
                break
        for tree, count in vendored.items():
            skipped_files.append({"distribution": name, "version": version, "path": tree, "files": count,
                                  "reason": "vendored code (other projects', under their own licences)"})
        if not files:
            skipped.append({"name": name, "version": version, "licence": licence.text, "reason": "no Python sources"})
            continue
        kept.append({"name": name, "version": version, "licence": licence.text, "files": files,
                     "bytes": sum(f[2] for f in files), "modules": modules})
    if not kept:
        raise CorpusError("no distribution with a permissive licence and Python sources matched"
                          + (f" --dist {' '.join(include)}" if include else ""))
    all_bytes = sum(d["bytes"] for d in kept)
    held: set[str] = set()
    if heldout:
        names = {_norm(d["name"]) for d in kept}
        unknown = [h for h in heldout if _norm(h) not in names]
        if unknown:
            raise CorpusError(f"--heldout {', '.join(unknown)}: not among the corpus distributions")
        held = {_norm(h) for h in heldout}
    elif len(kept) > 1 and heldout_fraction > 0:
        target, size = heldout_fraction * all_bytes, 0
        for d in sorted(kept, key=lambda d: hashlib.sha256(_norm(d["name"]).encode()).hexdigest()):
            if size >= target:
                break
            if d["bytes"] > 2 * target:  # would make the held-out set much larger than asked
                continue
            held.add(_norm(d["name"]))
            size += d["bytes"]
        if not held:  # every distribution is large: hold out the smallest
            held.add(_norm(min(kept, key=lambda d: d["bytes"])["name"]))
    kept = _drop_heldout_packages(kept, held, skipped, skipped_files)
    h = hashlib.sha256()
    for d in kept:
        for file_name, text, *_ in d["files"]:
            h.update(file_name.encode())
            h.update(hashlib.sha256(text.encode("utf-8")).digest())
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    version = "+".join([CODE_CORPUS_VERSION, f"py{py}"] + [f"{_norm(d['name'])}-{d['version']}" for d in kept]
                       + [h.hexdigest()[:12]])
    tmp = out.with_name(out.name + ".building")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    shards = []
    for split, chosen in (("train", [d for d in kept if _norm(d["name"]) not in held]),
                          ("heldout", [d for d in kept if _norm(d["name"]) in held])):
        shards += _shards(((f, t) for d in chosen for f, t, *_ in d["files"]), tmp, split, shard_bytes)
    split_bytes = {s: sum(d["bytes"] for d in kept if (_norm(d["name"]) in held) == (s == "heldout"))
                   for s in ("train", "heldout")}
    split_files = {s: sum(len(d["files"]) for d in kept if (_norm(d["name"]) in held) == (s == "heldout"))
                   for s in ("train", "heldout")}
    manifest = {
        "format": "blt-decode-corpus", "kind": SITE_CODE_KIND, "version": version,
        "recipe": {"include": list(include), "max_bytes": max_bytes, "heldout_fraction": heldout_fraction,
                   "heldout": list(heldout), "shard_bytes": shard_bytes},
        "distributions": [{"name": d["name"], "version": d["version"], "licence": d["licence"], "files": len(d["files"]),
                           "bytes": d["bytes"], "split": "heldout" if _norm(d["name"]) in held else "train"}
                          for d in kept],
        "skipped": skipped, "skipped_files": skipped_files, "duplicates_removed": duplicates,
        "train_bytes": split_bytes["train"], "heldout_bytes": split_bytes["heldout"], "shards": shards,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    seconds = time.perf_counter() - started
    log(f"code corpus: {len(kept)} distributions, {split_files['train']} + {split_files['heldout']} files, "
        f"{split_bytes['train'] / 1e6:.1f} MB train + {split_bytes['heldout'] / 1e6:.1f} MB held out "
        f"({', '.join(sorted(d['name'] for d in kept if _norm(d['name']) in held))}), {duplicates} duplicate files "
        f"removed, {len(shards)} shards, {seconds:.1f}s")
    for s in skipped:
        log(f"  skipped {s['name']} {s['version']}: {s['reason']} ({s['licence'] or 'none declared'})")
    for f in skipped_files:
        log(f"  skipped {f['path']}/ of {f['distribution']} {f['version']} ({f['files']} files): {f['reason']}")
    return BuildResult(str(out), version, split_bytes["train"], split_bytes["heldout"], split_files["train"],
                       split_files["heldout"], tuple(d["name"] for d in kept),
                       tuple(d["name"] for d in kept if _norm(d["name"]) in held), tuple(skipped), duplicates, seconds,
                       tuple(skipped_files))
