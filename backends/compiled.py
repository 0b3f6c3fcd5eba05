"""The compiled backend: every batch of primitive calls runs as a few compiled step graphs
(:class:`~blt_decode.execution.static_runner.StaticRunner`; CUDA graphs on a GPU), warmed up by
:meth:`CompiledBackend.warmup` or on first use; ``static`` is its alias. See docs/backends.md."""

from __future__ import annotations

import contextlib
import sys
import time
import weakref
from typing import Any, Callable, Iterator

import torch

from blt_decode.errors import BackendUnavailableError
from blt_decode.execution.static_runner import StaticRunner
from blt_decode.model.blt import BLTModel
from blt_decode.plugins.hookspecs import hookimpl


def unavailable(device: torch.device | str = "cpu") -> str | None:
    """Why the compiled backend cannot compile on ``device`` here (None: it can). On a CPU inductor
    compiles C++: without a compiler nothing runs."""
    if torch.device(device).type != "cpu":
        return None
    from torch._inductor import cpp_builder

    try:
        cpp_builder.get_cpp_compiler()
    except Exception as exc:  # inductor raises a bare RuntimeError naming the compilers it tried
        return f"no C++ compiler for torch.compile on this machine ({str(exc).splitlines()[0][:200]})"
    return None


def require_compiler(device: torch.device | str = "cpu") -> None:
    """Raise :class:`BackendUnavailableError` (one line, what to do) where :func:`unavailable` says why."""
    why = unavailable(device)
    if why is not None:
        raise BackendUnavailableError(f"the compiled backend cannot run: {why}; install one (g++) or use the eager "
                                      "backend")


def compiled_graph_count() -> int:
    """Graphs torch.compile has produced in this process (to check that nothing recompiles)."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


@contextlib.contextmanager
def compilations_reported(report: Callable[[int, float], None]) -> Iterator[None]:
    """Within the block, ``report(n, seconds)`` is told of every graph torch.compile finishes compiling
    (the n-th in the block, and how long it took): dynamo's compile callbacks, so any compiled code counts."""
    from torch._dynamo.callback import callback_handler as handler

    began, done = [0.0], [0]

    def start(_args: Any) -> None:
        began[0] = time.perf_counter()

    def end(_args: Any) -> None:
        done[0] += 1
        report(done[0], time.perf_counter() - began[0])

    handler.register_start_callback(start)
    handler.register_end_callback(end)
    try:
        yield
    finally:
        handler.remove_start_callback(start)
        handler.remove_end_callback(end)


class CompiledBackend:
    """The ``compiled`` backend (alias ``static``): one :class:`StaticRunner` per model, its step graphs
    compiled on first use or by :meth:`warmup`. ``compile=False`` runs the same graphs uncompiled."""

    name = "compiled"
    #: the name this backend had when two compiled backends existed (issue 34 merged them)
    aliases = ("static",)
    description = ("fixed-shape decode steps over device-resident state, compiled whole with torch.compile "
                   "(CUDA graphs on a GPU); fastest after a warm-up ('static' is an alias)")

    def __init__(self, *, compile: bool = True, name: str | None = None, progress: Callable[[str], None] | None = None):
        self.compile = compile
        if name is not None:
            self.name = name
            self.aliases = ()
        #: told of every graph compiled (the CLI prints to stderr); None: silent
        self.progress = progress
        self._runners: "weakref.WeakKeyDictionary[BLTModel, StaticRunner]" = weakref.WeakKeyDictionary()

    def runner(self, model: BLTModel) -> StaticRunner:
        """The model's runner, made once per model (its graphs compile on first use; a model moved to
        another dtype or device gets a new one)."""
        runner = self._runners.get(model)
        if runner is None or runner.made_for != (model.dtype, model.device):
            if self.compile:
                require_compiler(model.device)
            self._runners[model] = StaticRunner(model, compile=self.compile, progress=self._progress)
        return self._runners[model]

    def cuda_graph_stats(self) -> dict[str, int]:
        """CUDA graphs captured and replays of them, over this backend's runners (zeros off a GPU)."""
        total = {"captures": 0, "replays": 0}
        for runner in list(self._runners.values()):
            for key, n in runner.cuda_graph_stats.items():
                total[key] += n
        return total

    def _progress(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)

    def warmup(self, model: BLTModel, *, rows: tuple[int, ...] = (1,), progress: bool = False) -> float:
        """Compile the graphs of engine batches of up to ``max(rows)`` requests (any number of rows on a CPU,
        each row bucket up to it on CUDA; every chunk bucket; the global graphs:
        :meth:`~blt_decode.execution.static_runner.StaticRunner.warmup`) before
        timing starts, and the lone sessions' graphs if ``rows`` holds 1 (``generate``, and an engine of
        one slot, run those); with ``progress``, a bar on stderr. Returns the seconds it took (report it
        apart from decoding speed; a second process takes far less, from inductor's on-disk cache). Every
        strategy runs on the same graphs."""
        from tqdm import tqdm

        start = time.perf_counter()
        bar = tqdm(desc="compiling step graphs", unit="graph", disable=not progress, leave=False, file=sys.stderr)

        def step(done: int, total: int, name: str) -> None:
            bar.total = total
            bar.n = done
            bar.set_postfix_str(name)
            bar.refresh()

        self.runner(model).warmup(max_batch=max(rows), lone=1 in rows, progress=step)
        bar.close()
        return time.perf_counter() - start


@hookimpl
def register_backends(register):
    """Register the ``compiled`` backend (alias ``static``), silent until the CLI sets ``progress``."""
    register(CompiledBackend(progress=None))
