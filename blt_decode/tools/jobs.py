"""Batch generation jobs: requests from a JSONL file, results to a JSONL file, resumable. File formats,
bounds and locking: docs/engine.md."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import json
import os
import socket
import stat
import sys
import threading
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping

import attrs
from tqdm import tqdm

from blt_decode.checks import file_kind, loads_json, show
from blt_decode.engine.request import Request
from blt_decode.errors import BLTDecodeError, JobError
from blt_decode.model import tokenizer

if TYPE_CHECKING:
    from blt_decode.model.blt import BLTModel

#: the fields an input line may hold
FIELDS = ("id", "prompt", "prompt_hex", "strategy", "options", "max_new_bytes", "seed", "stop")
#: the longest line read from a JSONL file (an input request, a result record): a result of the longest
#: sequence a model may have (config.MAX_SEQLEN, 1 MiB) takes at most ~9 MiB (hex + escaped text + stats),
#: so a longer line is not ours, and reading it whole (a file of zeros, /dev/zero) could exhaust memory
MAX_LINE_BYTES = 16 << 20
#: the largest JSONL file read (a job's input, an output read back to resume, a HumanEval results file):
#: HumanEval at its most samples (164 problems x 1000 samples x a few strategies) writes about 2 GB
MAX_FILE_BYTES = 4 << 30


@attrs.frozen
class JobItem:
    """One input line: its id (a string, as written in the output) and its request."""

    id: str
    request: Request


def _same_strategy(a: str, b: str) -> bool:
    """Do two strategy names (or aliases) name the same strategy? Unknown names compare as written."""
    from blt_decode.errors import UnknownStrategyError
    from blt_decode.plugins import registry as plugins

    try:
        return plugins.get_strategy(a).name == plugins.get_strategy(b).name
    except UnknownStrategyError:
        return a == b


def _item(line: str, number: int, source: str, defaults: Mapping[str, Any]) -> JobItem:
    where = f"{source}:{number + 1}"
    try:
        data = loads_json(line)
    except ValueError as exc:
        raise JobError(f"{where}: {exc}") from None
    if not isinstance(data, dict):
        raise JobError(f"{where}: each line must be a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise JobError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(FIELDS)}")
    if ("prompt" in data) == ("prompt_hex" in data):
        raise JobError(f"{where}: give exactly one of 'prompt' (text) and 'prompt_hex' (raw bytes)")
    if "prompt" in data:
        if not isinstance(data["prompt"], str):
            raise JobError(f"{where}: 'prompt' must be a string, got {type(data['prompt']).__name__}")
        prompt: str | bytes = data["prompt"]
    else:
        try:
            prompt = bytes.fromhex(data["prompt_hex"])
        except (TypeError, ValueError):
            raise JobError(f"{where}: 'prompt_hex' must be a string of hex digits") from None
    ident = data.get("id", number)
    if isinstance(ident, bool) or not isinstance(ident, (str, int)):
        raise JobError(f"{where}: 'id' must be a string or an integer, got {ident!r}")
    default_strategy = defaults.get("strategy", "autoregressive")
    strategy = data.get("strategy", default_strategy)
    if not isinstance(strategy, str):
        raise JobError(f"{where}: 'strategy' must be a string, got {type(strategy).__name__}")
    # the job's default options belong to its default strategy: a line naming another one starts from none
    default_options = defaults.get("options", {}) if _same_strategy(strategy, default_strategy) else {}
    options = data.get("options", default_options)
    if not isinstance(options, dict):
        raise JobError(f"{where}: 'options' must be an object, got {type(options).__name__}")
    request = Request(
        prompt, strategy=strategy, options=options,
        max_new_bytes=data.get("max_new_bytes", defaults.get("max_new_bytes", 256)),
        stop=data.get("stop", defaults.get("stop", ())), seed=data.get("seed", defaults.get("seed")),
    )
    return JobItem(str(ident), request)


def read_requests(path: str | Path, defaults: Mapping[str, Any] | None = None,
                  check: Callable[[Request], Any] | None = None) -> list[JobItem]:
    """Every request of a JSONL input file (blank lines skipped). ``check`` validates each request (the
    API's :func:`~blt_decode.engine.request.prepare`), so a bad line fails before any decoding, naming its line."""
    path = Path(path)
    items, seen = [], set()
    for number, line in _input_lines(path):
        if not line.strip():
            continue
        item = _item(line, number, str(path), defaults or {})
        if item.id in seen:
            implicit = "" if '"id"' in line else " (this line has no 'id': its id is its line number, counting from 0)"
            raise JobError(f"{path}:{number + 1}: duplicate id {item.id!r}{implicit}")
        seen.add(item.id)
        if check is not None:
            try:
                check(item.request)
            except BLTDecodeError as exc:
                raise JobError(f"{path}:{number + 1}: {exc}") from None
        items.append(item)
    if not items:
        raise JobError(f"{path} holds no request")
    return items


# -- reading, bounded -----------------------------------------------------------------------------------
def _lines(fh: IO[bytes], path: Path) -> Iterator[tuple[int, int, bytes, bool]]:
    """(line index from 0, its offset, the line without its newline, whether a newline ended it) of a
    binary file, never holding more than one line of at most :data:`MAX_LINE_BYTES`, and refusing a file
    of more than :data:`MAX_FILE_BYTES` (a pipe or device included: the bound is on what is read)."""
    offset = 0
    for index in itertools.count():
        raw = fh.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        complete = raw.endswith(b"\n")
        if not complete and len(raw) > MAX_LINE_BYTES:
            raise JobError(f"{path}:{index + 1}: a line longer than {MAX_LINE_BYTES >> 20} MiB (the most a line of "
                           f"a JSONL file here may hold): not a JSONL file of requests or results")
        if offset + len(raw) > MAX_FILE_BYTES:
            raise JobError(f"{path} is larger than {MAX_FILE_BYTES >> 30} GiB (the most read from a JSONL file); "
                           f"split it into smaller files")
        yield index, offset, raw[:-1] if complete else raw, complete
        offset += len(raw)


def _input_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line index from 0, text) of an input file (a pipe such as /dev/stdin too: it is read once)."""
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise JobError(f"cannot read input file {path}: {exc.strerror or exc}") from None
    with fh:
        try:
            for index, _, raw, _ in _lines(fh, path):
                try:
                    yield index, raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise JobError(f"{path}:{index + 1}: not UTF-8 text (put raw prompt bytes in 'prompt_hex')") from None
        except OSError as exc:  # a directory, an unreadable device
            raise JobError(f"cannot read input file {path}: {exc.strerror or exc}") from None


def check_regular_file(path: str | Path) -> None:
    """An output that exists must be a regular file: a :class:`JobError` for a pipe (``/dev/stdout | cat``
    would read its own output back forever), a device (``/dev/full`` reads zeros until memory runs out) or
    a directory. Nothing is opened, so a FIFO cannot block the check."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise JobError(f"cannot use {path} as the output: {exc.strerror or exc}") from None
    if not stat.S_ISREG(mode):
        raise JobError(f"{path} is {file_kind(mode)}, not a regular file: results are appended to a file that a "
                       f"later run reads back to resume, so give the path of a file")


def read_results(path: str | Path, problem: Callable[[Any], str | None] | None = None, *,
                 keep: bool = False) -> tuple[set[str], list[dict[str, Any]]]:
    """The ids (and, with ``keep``, the records) of an output file, read line by line within the bounds of
    :func:`_lines`. Every complete line (ending in a newline) must be a record: ``problem(record)`` says
    what is wrong with one, None when nothing is (default :func:`result_problem`, the lines
    :func:`result_record` writes); else the file is refused untouched, naming the line and the problem. An
    unfinished last line (an interrupted write) is removed if it is not a record, and completed with its
    newline if it is, so the next append starts a line of its own. A missing file holds nothing."""
    problem = result_problem if problem is None else problem
    path = Path(path)
    check_regular_file(path)
    ids: set[str] = set()
    records: list[dict[str, Any]] = []
    try:
        fh = path.open("rb")
    except FileNotFoundError:
        return ids, records
    tail: tuple[int, bytes, Any] | None = None
    with fh:
        for index, offset, raw, complete in _lines(fh, path):
            if not raw.strip():
                continue
            try:
                record: Any = loads_json(raw)
                wrong = problem(record)
            except ValueError as exc:
                record, wrong = None, str(exc)
            if not complete:
                tail = (offset, raw, None if wrong else record)
                break
            if wrong:
                raise JobError(f"{path}:{index + 1}: {wrong}; refusing to append to this file, which is left untouched "
                               f"(fix or delete that line, or write to another file)")
            ids.add(str(record["id"]))
            if keep:
                records.append(record)
    if tail is not None:
        offset, raw, record = tail
        with path.open("r+b") as fh:
            if record is None:  # a torn final line: drop it, its request runs again
                fh.truncate(offset)
            else:
                fh.seek(0, 2)
                fh.write(b"\n")
                ids.add(str(record["id"]))
                if keep:
                    records.append(record)
    return ids, records


def finished_ids(path: str | Path, problem: Callable[[Any], str | None] | None = None) -> set[str]:
    """Ids already in an output file (:func:`read_results`; ``problem`` checks records of other kinds)."""
    return read_results(path, problem)[0]


def result_problem(record: Any) -> str | None:
    """What keeps ``record`` from being a line :func:`result_record` writes (a finished or a failed
    request), or None. Only those count as done when a job resumes: an input line, or any other JSON with
    an ``"id"``, does not."""
    if not isinstance(record, dict):
        return f"not a result line (a JSON {type(record).__name__}, not an object)"
    if isinstance(record.get("id"), bool) or not isinstance(record.get("id"), (str, int)):
        return "not a result line (no 'id' that is a string or an integer)"
    if set(record) == {"id", "output", "output_bytes_hex", "stats"}:
        if not isinstance(record["output"], str):
            return "not a result line ('output' must be a string)"
        if not _is_hex(record["output_bytes_hex"]):
            return "not a result line ('output_bytes_hex' must be a string of hex digits)"
        return None if isinstance(record["stats"], dict) else "not a result line ('stats' must be an object)"
    if set(record) in ({"id", "error"}, {"id", "error", "partial_output_bytes_hex"}):
        if not isinstance(record["error"], str):
            return "not a result line ('error' must be a string)"
        if not _is_hex(record.get("partial_output_bytes_hex", "")):
            return "not a result line ('partial_output_bytes_hex' must be a string of hex digits)"
        return None
    return (f"not a result line (fields {show(sorted(map(str, record)), 120)}; a result has id, output, "
            f"output_bytes_hex and stats, or id and error)")


def is_result_record(record: Any) -> bool:
    """Is ``record`` a line :func:`result_record` writes (:func:`result_problem` finds nothing wrong)?"""
    return result_problem(record) is None


def _is_hex(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        bytes.fromhex(value)
    except ValueError:
        return False
    return True


def check_output_path(input_path: str | Path, output_path: str | Path) -> None:
    """The results must go to a regular file (:func:`check_regular_file`) and not into the input file (its
    lines would be read as results, or it would be appended to): a :class:`JobError` when both name the
    same file, links included."""
    check_regular_file(output_path)
    source, target = Path(input_path), Path(output_path)
    same = target.resolve() == source.resolve()
    if not same and target.exists() and source.exists():
        same = target.samefile(source)
    if same:
        raise JobError(f"--output {output_path} is the --input file; write the results to another file")


def result_record(ident: str, output: bytes | None, stats: Any, error: BaseException | None) -> dict[str, Any]:
    """One output line (shared by every path that runs jobs)."""
    if error is not None:
        record: dict[str, Any] = {"id": ident, "error": f"{type(error).__name__}: {error}"}
        if output:
            record["partial_output_bytes_hex"] = output.hex()
        return record
    assert output is not None
    return {"id": ident, "output": tokenizer.display(output), "output_bytes_hex": output.hex(), "stats": stats.to_dict()}


# -- one writer at a time ----------------------------------------------------------------------------------
#: the outputs this process holds locked, by (device, inode), with how many holders: the lock is re-entrant
#: within a process (the CLI holds it around run_job, which takes it too), while flock would refuse a second
#: open file description of the same process
_HELD: dict[tuple[int, int], int] = {}
_HELD_GUARD = threading.Lock()


def lock_record_path(path: str | Path) -> Path:
    """Where the run writing ``path`` says who it is: ``OUTPUT.lock`` beside it."""
    path = Path(path)
    return path.with_name(path.name + ".lock")


def _holder(path: Path) -> str:
    """Who holds ``path`` (from its lock record), in words; read bounded, as any file here."""
    try:
        # non-blocking, and only a regular file: a FIFO planted there must not hang the refusal
        fd = os.open(lock_record_path(path), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ValueError("not a regular file")
            record = loads_json(fh.read(4096))
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(record["since"])))
        return f"pid {int(record['pid'])} on {str(record['host'])[:100]}, since {since}"
    except (OSError, ValueError, TypeError, KeyError, OverflowError):
        return "a process that has not said who it is"


@contextlib.contextmanager
def locked_output(path: str | Path) -> Iterator[Path]:
    """Hold the output ``path`` (a regular file, created if missing) for one writer: an advisory, non-blocking
    ``flock`` on it for as long as the block runs, and ``OUTPUT.lock`` naming this process (pid, host, start)
    for a second run's message. A second run (another process) gets a :class:`JobError` naming the holder;
    the same process may nest. Two runs appending to one file would each run every request (writing every
    record twice) and could interleave lines. The lock is released by the kernel if the process dies; a
    stale ``OUTPUT.lock`` is then overwritten by the next run. A file system without ``flock`` runs
    unlocked. A file created here that is still empty at the end (a run that failed before writing) is
    removed."""
    path = Path(path)
    fd, info, created, locked = _open_locked(path)
    key = (info.st_dev, info.st_ino)
    try:
        with _HELD_GUARD:
            nested = key in _HELD
            _HELD[key] = _HELD.get(key, 0) + 1
        if not nested and locked:
            _write_lock_record(lock_record_path(path))
        try:
            yield path
        finally:
            with _HELD_GUARD:
                _HELD[key] -= 1
                last = _HELD[key] == 0
                if last:
                    del _HELD[key]
            if last and locked:  # still holding the flock: nobody else can be using the record or the file
                with contextlib.suppress(OSError):
                    lock_record_path(path).unlink()
                with contextlib.suppress(OSError):
                    if created and os.fstat(fd).st_size == 0:
                        path.unlink()
    finally:
        os.close(fd)  # releases the flock of the outermost holder (a nested one holds another description)


def _open_locked(path: Path) -> tuple[int, os.stat_result, bool, bool]:
    """(fd, its stat, created here, flock held) of the output, or a :class:`JobError` naming the holder.
    The flock is taken on the file the path names once locked: a holder that removed the file (an empty one
    it created) between this open and the lock leaves an orphan, and the open is retried."""
    for _ in range(100):
        check_regular_file(path)
        created = not path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):  # replaced between the check and the open
                raise JobError(f"{path} is {file_kind(info.st_mode)}, not a regular file")
            with _HELD_GUARD:
                if (info.st_dev, info.st_ino) in _HELD:  # this process holds it already
                    return fd, info, created, True
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    return fd, info, created, False  # ENOLCK, EOPNOTSUPP: a file system without flock
                raise JobError(f"{path} is being written by another run ({_holder(path)}); wait for it to "
                               f"finish, or write to another file") from None
            try:
                now = os.stat(path)
            except FileNotFoundError:
                now = None
            if now is not None and (now.st_dev, now.st_ino) == (info.st_dev, info.st_ino):
                return fd, info, created, True
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise JobError(f"{path} keeps being replaced while this run tries to lock it")


def _write_lock_record(record: Path) -> None:
    """Write who holds the lock, whole or not at all (a temporary file renamed over it, so a reader never
    sees half of it and a link there is replaced, not followed). Best effort: a directory that takes the
    output but not another file leaves the message without a holder."""
    text = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                       "command": " ".join(sys.argv)[:500]})
    temporary = record.with_name(f".{record.name}.{os.getpid()}")
    try:
        temporary.write_text(text + "\n", encoding="utf-8")
        os.replace(temporary, record)
    except OSError:
        with contextlib.suppress(OSError):
            temporary.unlink()


def append_records(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """Append result records to a JSONL file, a line each, flushed as written (an interrupt loses at
    most the line being written, which :func:`finished_ids` then drops)."""
    with Path(path).open("a", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            fh.flush()


@attrs.frozen
class JobSummary:
    """What :func:`run_job` did."""

    total: int  #: requests in the input
    skipped: int  #: already in the output file
    done: int  #: finished now
    failed: int  #: finished with an error
    new_bytes: int


def run_job(model: "str | Path | BLTModel", items: list[JobItem], output: str | Path, *, batch_size: int = 16, backend: str = "eager",
            progress: bool = True) -> JobSummary:
    """Run the items not yet in ``output`` with the batched engine, appending a line per finished request."""
    from blt_decode.engine.core import Engine

    with locked_output(output):  # one run per output file (another one is refused, naming this one)
        done_before = finished_ids(output)
        todo = [item for item in items if item.id not in done_before]
        engine = Engine(model, backend=backend, max_batch=batch_size)
        streams = [(item, engine.submit_request(item.request)) for item in todo]
        failed = new_bytes = 0
        with tqdm(total=len(items), initial=len(items) - len(todo), desc="generate", unit="req", disable=not progress) as bar:
            for finished in engine.as_finished(streams):
                append_records(output, (result_record(item.id, s.output, s.stats, s.error) for item, s in finished))
                failed += sum(s.error is not None for _, s in finished)
                new_bytes += sum(len(s.output or b"") for _, s in finished)
                bar.update(len(finished))
    return JobSummary(len(items), len(items) - len(todo), len(todo), failed, new_bytes)
