"""A code corpus built offline from the Python sources of the installed distributions (site-packages).

``blt-decode corpus build code --out DIR`` (:func:`build_code_corpus`):

- every distribution importlib.metadata finds (``sys.path``), in name order, except this project;
- **licences**: each distribution's metadata is read (PEP 639 ``License-Expression``, else the
  ``License`` field and the ``License ::`` classifiers); only permissive licences are kept
  (:data:`PERMISSIVE`: MIT, BSD, Apache-2.0, ISC, PSF, ...). Copyleft (GPL, LGPL, MPL, ...), mixed and
  unknown licences are skipped and listed in the manifest with the reason;
- the ``.py`` files of the distribution's RECORD, UTF-8 only; **exact duplicates** (same bytes, e.g.
  vendored copies) are kept once, the first in name order;
- the **held-out split is by whole distribution**: distributions in the order of a hash of their name
  join the held-out set until it holds ``heldout_fraction`` of the bytes (one that alone would exceed
  twice that is passed over), so no file of a held-out package is trained on;
- the **version string** names the recipe, the Python version and every distribution with its version,
  plus a digest of all file names and contents;
- output: ``corpus.json`` (manifest) and gzip JSONL **shards** (``{"name", "text"}`` per line), which
  ``--data DIR`` reads.
"""

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
from pathlib import Path
from typing import Callable, Iterable, Sequence

import attrs

from blt_decode.corpus import CorpusError
from blt_decode.training.data import MANIFEST, SITE_CODE_KIND

CODE_CORPUS_VERSION = "blt-code-v1"
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
#: a short free-text License field -> SPDX-like id (first match wins)
_FREE_TEXT = (
    (re.compile(r"^(the )?mit( license)?\b", re.I), "MIT"),
    (re.compile(r"^(new |modified |simplified )?bsd\b|^bsd[- ]?[23][- ]clause", re.I), "BSD"),
    (re.compile(r"^apache( license| software license)?[ ,-]*(v(ersion)?[ -]?)?2(\.0)?\b|^apache[- ]2\.0", re.I), "APACHE-2.0"),
    (re.compile(r"^isc\b", re.I), "ISC"),
    (re.compile(r"^(psf|python software foundation)\b", re.I), "PSF"),
    (re.compile(r"^(l?gpl|agpl|gnu)\b|general public license", re.I), "GPL"),
    (re.compile(r"^(mpl|mozilla)\b", re.I), "MPL"),
)
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


def _expression_permissive(expression: str) -> tuple[bool, tuple[str, ...]]:
    # SPDX: "A OR B" is permissive when one alternative is; "A AND B" when all are; "WITH exc" adds an
    # exception to A (the exceptions used in practice, e.g. LLVM-exception, only grant more)
    cleaned = re.sub(r"[()]", " ", expression)
    cleaned = re.sub(r"\bWITH\s+\S+", " ", cleaned, flags=re.I)
    ids = tuple(t.upper().removesuffix("+") for t in cleaned.split() if t.upper() not in ("AND", "OR"))

    def permissive(alternative: str) -> bool:
        terms = [t.strip().upper().removesuffix("+") for t in re.split(r"\bAND\b", alternative, flags=re.I) if t.strip()]
        return bool(terms) and all(t in PERMISSIVE for t in terms)

    return any(permissive(alt) for alt in re.split(r"\bOR\b", cleaned, flags=re.I)), ids


def read_licence(meta: "metadata.PackageMetadata") -> Licence:
    """Classify a distribution's licence from its metadata (conservative: unknown is not permissive)."""
    expression = (meta.get("License-Expression") or "").strip()
    if expression:
        ok, ids = _expression_permissive(expression)
        return Licence(ids, ok, "License-Expression", expression[:120])
    evidence: list[str] = []
    sources = []
    field = (meta.get("License") or "").strip()
    if field and len(field) <= 200:
        for pattern, spdx in _FREE_TEXT:
            if pattern.search(field):
                evidence.append(spdx)
                sources.append("License")
                break
    for classifier in meta.get_all("Classifier") or []:
        if classifier.startswith("License ::"):
            name = classifier.split("::")[-1].strip()
            evidence.append(_CLASSIFIERS.get(name, name.upper()))
            sources.append("Classifier")
    if not evidence:
        return Licence((), False, "none", field.splitlines()[0][:120] if field else "")
    text = field.splitlines()[0][:120] if field else "; ".join(evidence)
    return Licence(tuple(evidence), all(e in PERMISSIVE for e in evidence), "+".join(dict.fromkeys(sources)), text)


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


def build_code_corpus(out_dir: str | Path, *, include: Sequence[str] = (), max_bytes: int | None = None,
                      heldout_fraction: float = 0.02, heldout: Sequence[str] = (), shard_bytes: int = 32 << 20,
                      paths: Sequence[str] | None = None, log: Callable[[str], None] = print) -> BuildResult:
    """Build the code corpus into ``out_dir`` (see the module docstring).

    ``include``: distribution-name patterns to keep (fnmatch, case-insensitive; default all);
    ``max_bytes``: stop once this much text is collected (distributions in name order, so a small, fixed
    subset for tests); ``heldout``: names to hold out instead of the hash rule; ``paths``: where to look
    for distributions (default ``sys.path``)."""
    started = time.perf_counter()
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise CorpusError(f"{out} exists and is not a corpus directory; give a new or empty --out")
    patterns = [p.lower() for p in include]
    kept: list[dict] = []
    skipped: list[dict] = []
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
            reason = "no licence in the metadata" if licence.source == "none" else "not a permissive licence"
            skipped.append({"name": name, "version": version, "licence": licence.text, "reason": reason})
            continue
        files = []
        for entry in sorted(dist.files or [], key=str):
            rel = str(entry)
            if not rel.endswith(".py") or ".." in Path(rel).parts:
                continue
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
            files.append((f"{name}/{rel}", text, len(data)))
            total += len(data)
            if max_bytes is not None and total >= max_bytes:
                break
        if not files:
            skipped.append({"name": name, "version": version, "licence": licence.text, "reason": "no Python sources"})
            continue
        kept.append({"name": name, "version": version, "licence": licence.text, "files": files,
                     "bytes": sum(f[2] for f in files)})
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
    h = hashlib.sha256()
    for d in kept:
        for file_name, text, _ in d["files"]:
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
        shards += _shards(((f, t) for d in chosen for f, t, _ in d["files"]), tmp, split, shard_bytes)
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
        "skipped": skipped, "duplicates_removed": duplicates,
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
    return BuildResult(str(out), version, split_bytes["train"], split_bytes["heldout"], split_files["train"],
                       split_files["heldout"], tuple(d["name"] for d in kept),
                       tuple(d["name"] for d in kept if _norm(d["name"]) in held), tuple(skipped), duplicates, seconds)
