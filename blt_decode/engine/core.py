"""The batched decoding engine: many requests at once, each decoded by an unchanged single-sequence strategy
(see docs/engine.md)."""

from __future__ import annotations

import collections
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import attrs
import greenlet
import torch

from blt_decode.checkpoints.resolve import load_model
from blt_decode.checks import is_int, show
from blt_decode.decoding.session import Call, DecodeSession
from blt_decode.decoding.stats import DecodeStats
from blt_decode.engine.driver import Committer, Generation, decode_request, utf8_text
from blt_decode.engine.request import DEFAULT_MAX_NEW_BYTES, PreparedRequest, Request, check_flag, prepare
from blt_decode.errors import CancelledError, EngineError
from blt_decode.execution.runner import CallResult, DecodeState, Runner
from blt_decode.model.blt import BLTModel
from blt_decode.model.stacks import Stack
from blt_decode.plugins import registry as plugins
from blt_decode.trace import Trace

#: the state's room per slot grows in steps of this many positions (fewer reallocations)
CAPACITY_STEP = 256
#: the most slots an engine may have (vLLM's default is 256 sequences at once); the decode state of that
#: many slots must also fit the device's free memory
MAX_BATCH = 4096

logger = logging.getLogger("blt_decode.engine.core")
T = TypeVar("T")


@attrs.frozen
class EngineStats:
    """What the engine did as a whole (per-request figures are in each request's DecodeStats)."""

    steps: int  #: engine steps (one batched call per stack at most)
    requests: int  #: requests finished (successfully or not)
    new_bytes: int  #: bytes committed over all requests
    wall_time_s: float  #: time spent stepping
    #: batched calls per stack, by stack name (``Stack.value``: "patcher", "encoder", "global", "decoder")
    stack_calls: dict[str, int]
    #: rows per batched call of each stack, on average (how full the batches were)
    rows_per_call: dict[str, float]
    #: live requests per step, on average (batch occupancy), and the engine's slot count
    mean_live: float
    max_batch: int

    @property
    def occupancy(self) -> float:
        """Mean share of the slots in use per step."""
        return self.mean_live / self.max_batch if self.max_batch else 0.0

    @property
    def bytes_per_second(self) -> float:
        """New bytes over all requests per second of stepping."""
        return self.new_bytes / self.wall_time_s if self.wall_time_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The fields and the derived figures, for JSON."""
        d = attrs.asdict(self)
        d.update(occupancy=self.occupancy, bytes_per_second=self.bytes_per_second)
        return d


class EngineStream:
    """One submitted request: iterate for byte chunks as they are committed (``.text()`` for whole
    characters); ``output`` and ``stats`` are set when it ends. Iterating drives the engine when no
    background thread does (:meth:`Engine.start`). A request that failed raises its error here."""

    def __init__(self, engine: "Engine", request: PreparedRequest, trace: bool,
                 listener: Callable[[bytes | None], None] | None = None):
        self.engine = engine
        self.request = request
        self.prompt = request.prompt
        self.strategy, self.options = request.strategy, request.options
        self.trace: Trace | None = Trace() if trace else None
        self.output: bytes | None = None
        self.stats: DecodeStats | None = None
        self.error: BaseException | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._done = False
        self._cancelled = False
        self._listener = listener
        self.committer = Committer(request)

    @property
    def done(self) -> bool:
        """Has the request ended (``output``, ``stats`` and ``error`` are then final)?"""
        return self._done

    def _notify(self, chunk: bytes | None) -> None:
        """Tell the listener (if any) of a new chunk, or (None) that the request has ended. A listener's
        failure must never break the engine or the other requests, so it is dropped."""
        if self._listener is not None:
            try:
                self._listener(chunk)
            except Exception:  # noqa: BLE001 - e.g. a closed event loop after its client left
                self._listener = None

    def cancel(self) -> None:
        """Stop this request at the engine's next step (its slot is freed; others are undisturbed). Never
        waits for a running step."""
        self._cancelled = True
        self.engine._work.set()

    def _next_chunk(self) -> bytes | None:
        """The next chunk, or None when the request has ended (raising its error, if any)."""
        engine = self.engine
        while True:
            with engine._lock:
                if self._chunks:
                    return self._chunks.popleft()
                if self._done:
                    if self.error is not None:
                        raise self.error
                    return None
                if engine._thread is not None:
                    # a timeout, so that a thread that has died unexpectedly is noticed
                    engine._wake.wait(timeout=1.0)
                    if engine._thread is not None and not engine._thread.is_alive() and not self._done:
                        raise EngineError("the engine's background thread is gone; this request cannot finish")
                    continue
            engine.step()

    def __iter__(self) -> Iterator[bytes]:
        while (chunk := self._next_chunk()) is not None:
            yield chunk

    def text(self) -> Iterator[str]:
        """The output as text, chunk by chunk, never splitting a UTF-8 character (as :meth:`Stream.text`)."""
        return utf8_text(iter(self))

    def result(self) -> Generation:
        """Wait for the whole output (driving the engine if needed) and return it as a Generation."""
        for _ in self:
            pass
        assert self.stats is not None and self.output is not None
        return Generation(output=self.output, stats=self.stats, prompt=self.prompt, trace=self.trace)


class _Live:
    """A request holding a slot: its session, its greenlet, and what it waits for."""

    def __init__(self, stream: EngineStream, session: DecodeSession, glet: greenlet.greenlet):
        self.stream, self.session, self.glet = stream, session, glet
        self.call: Call | None = None  # the primitive call it is paused on
        self.result: Any = None  # what to resume it with (logits or an exception)
        self.started = False
        self.finished = False


class Engine:
    """Runs many requests at once with continuous batching.

    ``Engine(model, backend="eager", max_batch=16)``; :meth:`submit` returns an :class:`EngineStream`.
    Requests join as soon as a slot is free, leave at EOS, a stop sequence, ``max_new_bytes``, an error
    or cancellation, and their slot is reused. Requests in one batch may use different strategies and
    options. Without :meth:`start`, the engine advances whenever a stream is iterated; with it, a
    background thread steps the engine while there is work (for servers). Each slot holds what the
    requests in it need (prompt, new bytes, the strategy's lookahead), at most ``max_capacity`` positions
    when one is given."""

    def __init__(self, model: str | Path | BLTModel, *, backend: str = "eager", max_batch: int = 16,
                 max_capacity: int | None = None):
        if not is_int(max_batch) or not 1 <= max_batch <= MAX_BATCH:
            raise EngineError(f"max_batch must be an integer in 1..{MAX_BATCH}, got {show(max_batch)}")
        if max_capacity is not None and (not is_int(max_capacity) or max_capacity < 1):
            raise EngineError(f"max_capacity must be an integer >= 1 (positions per slot) or None, got {max_capacity!r}")
        self.model = load_model(model)
        self.backend = plugins.get_backend(backend)
        self.runner: Runner = self.backend.runner(self.model)
        self._tally: dict[Stack, list[int]] = {stack: [0, 0] for stack in Stack}
        self.max_batch = max_batch
        #: positions per slot at most; None: what each request needs (prepare bounds its prompt and new
        #: bytes by max_seqlen, its strategy's lookahead by MAX_LOOKAHEAD), within the device's free memory
        self.max_capacity = max_capacity
        self.state: DecodeState | None = None
        self._position_bytes = _bytes_per_position(self.model, self.runner)
        self._check_fits(CAPACITY_STEP, "max_batch")  # the first allocation, before any request arrives
        self._failure: EngineError | None = None  # why the background thread stopped, if it failed
        self._waiting: collections.deque[EngineStream] = collections.deque()
        self._live: dict[int, _Live] = {}
        # _lock: the engine's state, held by a step throughout; _wake: streams waiting for chunks.
        # _queue_lock: only the waiting queue, held for microseconds, so submitting never waits for a step
        # (Python locks are not fair: a submit behind a busy stepping thread could wait many steps).
        # _work: wakes the background thread when a request arrives or is cancelled.
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._queue_lock = threading.Lock()
        self._work = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._steps = 0
        self._finished = 0
        self._new_bytes = 0
        self._live_sum = 0
        self._wall = 0.0

    # -- submitting -----------------------------------------------------------------------------------
    def submit(self, prompt: str | bytes, *, strategy: str = "autoregressive", max_new_bytes: int | None = None,
               stop: str | bytes | Sequence[str | bytes] = (), seed: int | None = None, trace: bool = False,
               **options: Any) -> EngineStream:
        """Queue one request (validated now: a bad one raises here and nothing is queued)."""
        request = Request(prompt, strategy=strategy, options=options,
                          max_new_bytes=DEFAULT_MAX_NEW_BYTES if max_new_bytes is None else max_new_bytes,
                          stop=stop, seed=seed)
        return self.submit_request(request, trace=trace)

    def submit_request(self, request: Request, *, trace: bool = False,
                       listener: Callable[[bytes | None], None] | None = None) -> EngineStream:
        """Queue a :class:`~blt_decode.engine.request.Request`.

        ``listener``, if given, is called from the thread that steps the engine with each new chunk and
        with None once the request has ended (``output``, ``stats`` and ``error`` set): async code can
        follow a stream without waiting on the engine's lock, which a step holds throughout (a server
        passes ``loop.call_soon_threadsafe``-based callbacks). It must return quickly and not call into
        the engine; one that raises is dropped. The stream's own chunk queue is filled as usual."""
        check_flag("trace", trace)
        prepared = prepare(request, self.model.config.max_seqlen)
        self.check_admissible(prepared)
        stream = EngineStream(self, prepared, trace, listener)
        with self._queue_lock:
            self._waiting.append(stream)
        self._work.set()
        return stream

    def check_admissible(self, request: PreparedRequest) -> None:
        """Raise :class:`EngineError` unless the engine can take ``request``: it is running (or was never
        started), the request's positions fit ``max_capacity``, and the decode state it may make the
        engine grow to fits the free memory of the model's device. Checked before the request is queued."""
        if self._failure is not None:
            raise EngineError(f"{self._failure}; this engine takes no more requests (make a new one)")
        if self.max_capacity is not None and request.capacity > self.max_capacity:
            raise EngineError(f"the request needs {request.capacity} positions; this engine allows {self.max_capacity}")
        self._check_fits(request.capacity, "max_new_bytes")

    def _check_fits(self, need: int, what: str) -> None:
        """The state of ``max_batch`` slots grown to hold ``need`` positions must fit the device's free
        memory (the old state stays allocated while its rows are copied); ``what`` is what the caller may
        lower. Memory can still run out by the time the request is admitted: then only it fails."""
        if self.state is not None and self.state.capacity >= need:
            return
        capacity = self._grown_capacity(need)
        size = self.max_batch * capacity * self._position_bytes
        free = free_memory_bytes(self.model.device)
        if free is not None and size > free:
            raise EngineError(
                f"the decode state for {self.max_batch} slots x {capacity} positions would take {size / 2**30:.2f} GiB, "
                f"more than the {free / 2**30:.2f} GiB free on {self.model.device}; lower {what}"
                + (" or max_batch" if what != "max_batch" else ""))

    # -- stepping -------------------------------------------------------------------------------------
    @property
    def idle(self) -> bool:
        """No request waiting and none in a slot."""
        return not self._waiting and not self._live

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a slot."""
        return len(self._waiting)

    @property
    def live_requests(self) -> int:
        """Requests holding a slot."""
        return len(self._live)

    @property
    def running(self) -> bool:
        """Is a background thread (:meth:`start`) stepping the engine?"""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def step(self) -> None:
        """One engine step: admit, advance every live request to its next primitive call, run the calls
        batched, retire finished requests. Only the background thread steps an engine that was started."""
        self._check_foreground()
        self._step(admit=True)

    def _check_foreground(self) -> None:
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            raise EngineError("this engine is stepped by its background thread (Engine.start()); "
                              "iterate its streams instead of calling step() or run_until_idle()")

    def _step(self, admit: bool) -> None:
        with self._lock:
            started = time.perf_counter()
            grad = torch.is_grad_enabled()
            try:
                with torch.no_grad():
                    if admit:
                        self._admit()
                    self._advance()
                    self._run_pending()
            finally:
                # strategies enter and leave no_grad inside greenlets, interleaved: restore the caller's mode
                torch.set_grad_enabled(grad)
            self._steps += 1
            self._live_sum += len(self._live)
            self._wall += time.perf_counter() - started
            self._retire_done()
            self._wake.notify_all()

    def run_until_idle(self) -> None:
        """Step until every submitted request has ended (driving the engine in this thread)."""
        self._check_foreground()
        while not self.idle:
            self.step()

    def as_finished(self, tagged: Sequence[tuple[T, EngineStream]]) -> Iterator[list[tuple[T, EngineStream]]]:
        """Step (in this thread) until every stream of ``tagged`` has ended, yielding after each step the
        ``(tag, stream)`` pairs whose stream ended in it, in submission order (steps that end none yield
        nothing). Batch jobs write each finished request as soon as it ends."""
        pending = list(tagged)
        while pending:
            self.step()
            finished = [pair for pair in pending if pair[1].done]
            if finished:
                pending = [pair for pair in pending if not pair[1].done]
                yield finished

    def _admit(self) -> None:
        while self._waiting and len(self._live) < self.max_batch:
            with self._queue_lock:
                stream = self._waiting.popleft()
            if stream._cancelled:
                self._finish(stream, None, CancelledError("request cancelled before it started"))
                continue
            slot = min(set(range(self.max_batch)) - set(self._live))
            try:
                self._ensure_capacity(stream.request.capacity)
                assert self.state is not None
                session = DecodeSession(self.model, stream.request.capacity, state=self.state, slot=slot,
                                        executor=self._pause)
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory: this request fails, the others go on
                error = EngineError(f"could not admit the request ({stream.request.capacity} positions, engine state "
                                    f"{self.max_batch} slots): {type(exc).__name__}: {_first_line(exc)}")
                error.__cause__ = exc
                logger.error("%s", error)
                self._finish(stream, None, error)
                continue
            session.trace = stream.trace
            live = _Live(stream, session, greenlet.greenlet(self._drive))
            self._live[slot] = live

    def _grown_capacity(self, need: int) -> int:
        """The room per slot a state grown for ``need`` positions gets: ``need`` rounded up to a
        :data:`CAPACITY_STEP`, within ``max_capacity``."""
        capacity = -(-need // CAPACITY_STEP) * CAPACITY_STEP
        return capacity if self.max_capacity is None else min(self.max_capacity, capacity)

    def _ensure_capacity(self, need: int) -> None:
        """Allocate the slots' state on first use, and grow it (copying live slots) when a request needs
        more room than any before it."""
        if self.state is not None and self.state.capacity >= need:
            return
        capacity = self._grown_capacity(need)
        new = self.runner.new_state(self.max_batch, capacity)
        old = self.state
        if old is not None:
            new.copy_from(old)
            for live in self._live.values():
                live.session.move_to(new)
        self.state = new

    def _pause(self, session: DecodeSession, call: Call) -> CallResult:
        """The executor of engine sessions: pause this request's greenlet until the batch has run."""
        return greenlet.getcurrent().parent.switch(call)

    def _drive(self, live: _Live) -> None:
        """A request's greenlet: the framework's loop of Stream.__iter__, with chunks pushed to the stream."""
        stream, session = live.stream, live.session
        error: BaseException | None = None
        try:
            for fresh in decode_request(stream.request, session, stream.committer):
                with self._lock:
                    stream._chunks.append(fresh)
                    self._new_bytes += len(fresh)
                    stream._notify(fresh)
        except greenlet.GreenletExit:
            error = CancelledError("request cancelled")
        except Exception as exc:  # a strategy's failure fails only its own request
            error = exc
        # KeyboardInterrupt, SystemExit and the like are not the request's failure: they leave this
        # greenlet and step() (see _advance), stopping whoever drives the engine
        self._finish(stream, session, error)
        live.finished = True

    def _finish(self, stream: EngineStream, session: DecodeSession | None, error: BaseException | None) -> None:
        with self._lock:
            stream.output = bytes(stream.committer.out)
            if session is not None:
                stream.stats = stream.committer.stats(session.stats, self.model.param_counts(), session.closed_patches)
            stream.error = error
            stream._done = True
            self._finished += 1
            self._wake.notify_all()
            stream._notify(None)

    def _advance(self) -> None:
        """Resume every live request until it pauses on its next call or ends."""
        hub = greenlet.getcurrent()
        for live in list(self._live.values()):
            if live.glet.parent is not hub:
                raise EngineError("an engine must be stepped from one thread; use Engine.start() when several "
                                  "threads consume its streams")
            if live.stream._cancelled and not live.finished:
                if live.started:
                    live.call = None
                    live.glet.throw(greenlet.GreenletExit)  # _drive ends the request as cancelled
                else:
                    self._finish(live.stream, live.session, CancelledError("request cancelled before it started"))
                    live.finished = True
                continue
            if live.call is not None or live.finished:
                continue
            try:
                value = live.glet.switch(live) if not live.started else live.glet.switch(live.result)
            except BaseException as exc:  # an interrupt raised inside a strategy: end its request, pass it on
                self._finish(live.stream, live.session, exc)
                live.finished = True
                raise
            live.started = True
            live.result = None
            live.call = None if live.finished else value

    def _run_pending(self) -> None:
        paused = sorted((slot, live) for slot, live in self._live.items() if live.call is not None)
        if not paused:
            return
        items = [(live.session, live.call) for _, live in paused]
        try:
            results = self.runner.run(self.state, items, self._count)
        except Exception as exc:  # a failure of the batched pass itself: every row in it gets the error
            results = [CallResult(exc)] * len(items)
        for (_, live), result in zip(paused, results):
            live.call = None
            live.result = result

    def _count(self, stack: Stack, rows: int) -> None:
        """The runner's report of one batched stack call over ``rows`` requests."""
        calls_rows = self._tally[stack]
        calls_rows[0] += 1
        calls_rows[1] += rows

    def _retire_done(self) -> None:
        for slot in [s for s, live in self._live.items() if live.finished]:
            del self._live[slot]

    # -- statistics -----------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        """The engine's figures so far (batch occupancy, calls and rows per stack, bytes/s)."""
        with self._lock:
            calls = {stack.value: v[0] for stack, v in self._tally.items()}
            rows = {stack.value: (v[1] / v[0] if v[0] else 0.0) for stack, v in self._tally.items()}
            return EngineStats(self._steps, self._finished, self._new_bytes, self._wall, calls, rows,
                               self._live_sum / self._steps if self._steps else 0.0, self.max_batch)

    # -- background stepping (servers) -----------------------------------------------------------------
    def start(self) -> "Engine":
        """Step in a background thread while there is work; streams then wait instead of stepping.

        A request's strategy runs in a greenlet bound to the thread that admitted it, so an engine with
        requests in its slots (stepped in the foreground) cannot be started: finish them first."""
        with self._lock:
            if self._thread is None:
                if self._live:
                    raise EngineError(f"cannot start an engine with {len(self._live)} request(s) in its slots "
                                      "stepped by this thread; run_until_idle() first, or start() before submitting")
                self._stopping = False
                self._thread = threading.Thread(target=self._loop, name="blt-decode-engine", daemon=True)
                self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the background thread. Requests holding a slot are finished first (their greenlets
        belong to that thread); requests still waiting for a slot stay queued, and iterating them then
        drives the engine in the consumer's thread."""
        thread, self._stopping = self._thread, True
        self._work.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self._lock:
            self._thread = None
            self._wake.notify_all()

    def _loop(self) -> None:
        try:
            while not (self._stopping and not self._live):
                if self.idle:
                    # a submit between the check and the wait has set the event: the wait returns at once
                    self._work.wait()
                    self._work.clear()
                    continue
                self._step(admit=not self._stopping)
        except BaseException as exc:  # noqa: BLE001 - the thread must never die leaving streams waiting
            self._crashed(exc)

    def _crashed(self, exc: BaseException) -> None:
        """The background thread failed outside any one request: fail every request it held or queued
        (their waiters wake up with the error) and leave the engine stopped."""
        error = EngineError(f"the engine's background thread failed: {type(exc).__name__}: {exc}")
        error.__cause__ = exc
        logger.error("%s", error, exc_info=exc)
        self._failure = error
        with self._lock:
            with self._queue_lock:
                waiting, self._waiting = list(self._waiting), collections.deque()
            for stream in waiting:
                self._finish(stream, None, error)
            for live in self._live.values():
                if not live.finished:
                    self._finish(live.stream, live.session, error)
                    live.finished = True
            self._live.clear()
            self._thread = None
            self._wake.notify_all()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _bytes_per_position(model: BLTModel, runner: Runner) -> int:
    """Bytes the decode state takes per slot and position (every tensor of it grows with both), measured
    on a plain state of one slot and one position (a runner's own state may add a scratch slot and a
    margin of positions, small next to the states this check is about)."""
    probe = DecodeState(model, 1, 1, runner)
    return sum(t.numel() * t.element_size() for t in probe.tensors().values())


def free_memory_bytes(device: torch.device | str) -> int | None:
    """Memory that can still be allocated on ``device``: on CUDA the driver's free memory plus what torch
    holds cached but unused; on the CPU the kernel's MemAvailable (and at most what the cgroup's
    memory.max leaves). None where it cannot be known (nothing is then refused up front)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    try:  # a container's limit is not in /proc/meminfo
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if free is not None and limit.isdigit():
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            free = min(free, max(int(limit) - used, 0))
    except (OSError, ValueError):
        pass
    return free
