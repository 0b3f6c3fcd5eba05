"""The compiled backend: the four transformer stacks' chunk calls run through ``torch.compile``.

What is compiled is exactly what a decode step spends its time in: the entropy-model, encoder, global
and decoder stacks over a chunk of positions against their KV caches (a decoder step, a draft step, the
encoder/patch step, the global step, a verification pass). The session's Python logic (patch
decisions, rollback, strategy loops) stays eager and is shared with the eager backend.

Shapes. Stacks are compiled with ``dynamic=True``: the chunk length and the cache length are symbolic,
so a generation of a new length reuses the graphs compiled during warm-up. torch.compile specialises
sizes 0 and 1, so each stack gets two graphs, one for single-position steps and one for chunks (prefill,
verification); with the decoder's block layout (``mask``/``positions``, BLT-D) a third. The KV caches
are the session's preallocated buffers, written in place.

CUDA. On a CUDA device the stacks compile with ``mode="reduce-overhead"`` (CUDA graphs). The compiled
region has no host synchronisation: entropies are copied to the host (``tolist``) by the session, outside
the compiled stacks. Graph-owned outputs are copied out (``clone``) before the next call can reuse them.

No silent fallback: a compilation error propagates (``torch._dynamo.config.suppress_errors`` stays off).
"""

from __future__ import annotations

import contextlib
import sys
import time
import weakref
from typing import Any, Callable, Iterator

import torch

from blt_decode.hookspecs import hookimpl
from blt_decode.model import BLTModel
from blt_decode.runner import EagerRunner, StackRunners
from blt_decode.session import DecodeSession


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


def _copy_out(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    # CUDA graphs own their output buffers and overwrite them on the next replay
    def run(*args: Any, **kwargs: Any) -> torch.Tensor:
        return fn(*args, **kwargs).clone()

    return run


class CompiledBackend:
    name = "compiled"
    description = "torch.compile'd stack calls (dynamic shapes, no per-length recompiles; CUDA graphs on GPU)"

    def __init__(self) -> None:
        self._runners: "weakref.WeakKeyDictionary[BLTModel, StackRunners]" = weakref.WeakKeyDictionary()

    def runners(self, model: BLTModel) -> StackRunners:
        """Compiled callables for ``model``'s stacks, made once per model (compilation itself is lazy)."""
        if model not in self._runners:
            cuda = model.device.type == "cuda"
            mode = "reduce-overhead" if cuda else None

            def compile_stack(module: torch.nn.Module | None) -> Callable[..., torch.Tensor] | None:
                if module is None:
                    return None
                compiled = torch.compile(module, dynamic=True, mode=mode)
                return _copy_out(compiled) if cuda else compiled

            self._runners[model] = StackRunners(
                entropy=compile_stack(model.entropy_model),
                encoder=compile_stack(model.local_encoder),
                global_=compile_stack(model.global_transformer),
                decoder=compile_stack(model.local_decoder),
            )
        return self._runners[model]

    def runner(self, model: BLTModel) -> EagerRunner:
        """The eager runner's logic over the compiled stacks (any batch size)."""
        return EagerRunner(model, self.runners(model))

    def open_session(self, model: BLTModel, capacity: int) -> DecodeSession:
        return DecodeSession(model, capacity, self.runner(model))

    def warmup(self, model: BLTModel, strategies: tuple[str, ...] = ("autoregressive", "blt-s"), *,
               rows: tuple[int, ...] = (1,), progress: bool = False) -> float:
        """Compile every graph a generation needs (single-position steps and chunks) before timing
        starts; returns the seconds it took. Report it apart from decoding speed. With ``progress``, a
        bar on stderr counts the graphs compiled (each strategy's warm-up generation compiles a few).
        (``rows`` is the static backend's: dynamic shapes serve every batch size here.)"""
        from tqdm import tqdm

        from blt_decode.api import generate

        start = time.perf_counter()
        bar = tqdm(desc="compiling stacks", unit=" graphs", disable=not progress, leave=False, file=sys.stderr)

        def compiled(n: int, seconds: float) -> None:
            bar.update()
            bar.set_postfix_str(f"last {seconds:.1f} s")

        with compilations_reported(compiled):
            for strategy in strategies:
                bar.set_description(f"compiling stacks ({strategy})")
                generate(model, "warm-up prompt", strategy=strategy, backend=self.name, max_new_bytes=12)
        bar.close()
        return time.perf_counter() - start


@hookimpl
def register_backends(register):
    register(CompiledBackend())
