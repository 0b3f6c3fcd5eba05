"""The static backend: every batch of primitive calls runs as a few compiled fixed-shape graphs.

The runner is :class:`~blt_decode.static_runner.StaticRunner`: device-resident bookkeeping, one graph per
call kind and shape bucket, compiled with ``torch.compile(fullgraph=True, dynamic=False)`` (inductor's
C++ kernels on a CPU), at most two host reads per batch. Graphs compile on first use (or in
:meth:`StaticBackend.warmup`), and inductor keeps what it built in its on-disk cache
(``TORCHINDUCTOR_CACHE_DIR``), so a second process warms up much faster. See docs/backends.md.
"""

from __future__ import annotations

import sys
import time
import weakref
from typing import Callable

from blt_decode.hookspecs import hookimpl
from blt_decode.model import BLTModel
from blt_decode.session import DecodeSession
from blt_decode.static_runner import StaticRunner


class StaticBackend:
    name = "static"
    description = ("fixed-shape decode steps over device-resident state, compiled whole with torch.compile "
                   "(fullgraph); fastest after a warm-up")

    def __init__(self, *, compile: bool = True, name: str | None = None, progress: Callable[[str], None] | None = None):
        self.compile = compile
        if name is not None:
            self.name = name
        #: told of every graph compiled (the CLI prints to stderr); None: silent
        self.progress = progress
        self._runners: "weakref.WeakKeyDictionary[BLTModel, StaticRunner]" = weakref.WeakKeyDictionary()

    def runner(self, model: BLTModel) -> StaticRunner:
        """The model's static runner, made once per model (its graphs compile on first use; a model moved
        to another dtype or device gets a new one)."""
        runner = self._runners.get(model)
        if runner is None or runner.made_for != (model.dtype, model.device):
            self._runners[model] = StaticRunner(model, compile=self.compile, progress=self._progress)
        return self._runners[model]

    def _progress(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)

    def open_session(self, model: BLTModel, capacity: int) -> DecodeSession:
        return DecodeSession(model, capacity, self.runner(model))

    def warmup(self, model: BLTModel, strategies: tuple[str, ...] = (), *, rows: tuple[int, ...] = (1,),
               progress: bool = False) -> float:
        """Compile the graphs of batches of up to ``max(rows)`` requests (every row bucket up to it, every
        chunk bucket, the common global buckets: :meth:`~blt_decode.static_runner.StaticRunner.warmup`)
        before timing starts, and the lone sessions' graphs if ``rows`` holds 1 (``generate``, and an
        engine of one slot, run those); with ``progress``, a bar on stderr. Returns the seconds it took (report it apart from decoding speed;
        a second process takes far less, from inductor's on-disk cache). ``strategies`` is accepted for
        the other compiled backend's signature: every strategy uses the same graphs."""
        from tqdm import tqdm

        start = time.perf_counter()
        bar = tqdm(desc="compiling static graphs", unit="graph", disable=not progress, leave=False, file=sys.stderr)

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
    register(StaticBackend(progress=None))
