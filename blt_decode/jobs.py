"""Batch generation jobs: requests from a JSONL file, results to a JSONL file, resumable.

Input: one JSON object per line with ``prompt`` (text; or ``prompt_hex`` for raw bytes) and optional
``id``, ``strategy``, ``options`` (an object), ``max_new_bytes``, ``seed`` and ``stop`` (a string or a
list of strings); fields a line leaves out take the job's defaults. Ids default to the line number
(counting from 0) and must be unique.

Output: one JSON object per finished request with ``id``, ``output`` (the text; invalid UTF-8 replaced
as in :attr:`Generation.text`), ``output_bytes_hex`` and ``stats`` (:meth:`DecodeStats.to_dict`); a
request that failed gets ``error`` instead. Lines are written as requests finish (in the order they
finish, not in input order: match them by ``id``), so an interrupted job loses at most the requests in
flight: run it again with the same output file and the ids already there are skipped (a torn last line
is dropped first; a line that is not such a result record, e.g. an input line, refuses the file). A failed request's ``error`` line counts as finished
(failures such as a broken strategy repeat); delete those lines to run them again. The single-machine path (:func:`run_job`, on the batched
engine) and the Ray Data path write the same records (:func:`result_record`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import attrs
from tqdm import tqdm

from blt_decode import tokenizer
from blt_decode.errors import BLTDecodeError, JobError
from blt_decode.request import Request

if TYPE_CHECKING:
    from blt_decode.model import BLTModel

#: the fields an input line may hold
FIELDS = ("id", "prompt", "prompt_hex", "strategy", "options", "max_new_bytes", "seed", "stop")


@attrs.frozen
class JobItem:
    """One input line: its id (a string, as written in the output) and its request."""

    id: str
    request: Request


def _same_strategy(a: str, b: str) -> bool:
    """Do two strategy names (or aliases) name the same strategy? Unknown names compare as written."""
    from blt_decode import plugins
    from blt_decode.errors import UnknownStrategyError

    try:
        return plugins.get_strategy(a).name == plugins.get_strategy(b).name
    except UnknownStrategyError:
        return a == b


def _item(line: str, number: int, source: str, defaults: Mapping[str, Any]) -> JobItem:
    where = f"{source}:{number + 1}"
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise JobError(f"{where}: not valid JSON ({exc.msg})") from None
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
    API's :func:`~blt_decode.request.prepare`), so a bad line fails before any decoding, naming its line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise JobError(f"cannot read input file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise JobError(f"{path} is not UTF-8 text (put raw prompt bytes in 'prompt_hex')") from None
    items, seen = [], set()
    for number, line in enumerate(lines):
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


def finished_ids(path: str | Path, is_record: Callable[[Any], bool] | None = None) -> set[str]:
    """Ids already in an output file. Every complete line (ending in a newline) must be a result record
    (:func:`is_result_record`, or ``is_record`` for files of other record kinds), else the file is refused
    untouched. An unfinished last line (an interrupted write) is removed if it is not a record, and
    completed with its newline if it is, so the next append starts a line of its own."""
    is_record = is_result_record if is_record is None else is_record
    path = Path(path)
    if not path.exists():
        return set()
    data = path.read_bytes()
    lines = data.split(b"\n")  # the last item is what follows the last newline ("" when the file ends in one)
    ids: set[str] = set()

    def record_id(raw: bytes) -> str | None:
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        return str(record["id"]) if is_record(record) else None

    for index, raw in enumerate(lines[:-1]):
        if not raw.strip():
            continue
        ident = record_id(raw)
        if ident is None:
            raise JobError(f"{path}:{index + 1}: not a result line; refusing to append to this file")
        ids.add(ident)
    tail = lines[-1]
    if tail.strip():
        ident = record_id(tail)
        with path.open("r+b") as fh:
            if ident is None:  # a torn final line: drop it, its request runs again
                fh.truncate(len(data) - len(tail))
            else:
                fh.seek(0, 2)
                fh.write(b"\n")
                ids.add(ident)
    return ids


def is_result_record(record: Any) -> bool:
    """Is ``record`` a line :func:`result_record` writes (a finished or a failed request)? Only those
    count as done when a job resumes: an input line, or any other JSON with an ``"id"``, does not."""
    if not isinstance(record, dict) or isinstance(record.get("id"), bool) or not isinstance(record.get("id"), (str, int)):
        return False
    if set(record) == {"id", "output", "output_bytes_hex", "stats"}:
        return isinstance(record["output"], str) and _is_hex(record["output_bytes_hex"]) and isinstance(record["stats"], dict)
    if set(record) in ({"id", "error"}, {"id", "error", "partial_output_bytes_hex"}):
        return isinstance(record["error"], str) and _is_hex(record.get("partial_output_bytes_hex", ""))
    return False


def _is_hex(value: Any) -> bool:
    try:
        bytes.fromhex(value)
    except (TypeError, ValueError):
        return False
    return True


def check_output_path(input_path: str | Path, output_path: str | Path) -> None:
    """The results must not go into the input file (its lines would be read as results, or it would be
    appended to): a :class:`JobError` when both name the same file, links included."""
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
    from blt_decode.engine import Engine

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
