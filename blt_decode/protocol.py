"""The decoding protocol: what a strategy and a backend are.

A **strategy** decides *which* bytes to emit. It is an object with

- ``name`` (str), ``description`` (one line), ``aliases`` (tuple of str, may be empty);
- ``Options``: an attrs class whose fields are the strategy's options, validated on construction;
- ``lookahead(options) -> int``: how many positions past the committed sequence it may write (drafts,
  diffusion blocks), so the session can preallocate room;
- ``decode(session, context, options)``: a generator that yields the token ids it *commits*, in chunks
  (one id for autoregressive decoding, an accepted run for speculative strategies). The framework turns
  ids into bytes, stops at EOS, stop sequences and ``max_new_bytes``, and closes the generator; a
  strategy never needs to check those itself, but may read ``context.max_new_bytes`` to avoid waste.

A strategy touches the model only through the :class:`~blt_decode.session.DecodeSession` primitives and
never imports another strategy.

A **backend** decides *how* the model runs. It has ``name``, ``description``,
``open_session(model, capacity) -> DecodeSession`` (one sequence) and, to run under the batched
:class:`~blt_decode.engine.Engine`, ``runner(model)`` (a :class:`~blt_decode.runner.Runner`, which executes
batches of primitive calls; the older ``runners(model) -> StackRunners`` still works, run by the eager
runner).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Protocol, Sequence, runtime_checkable

import attrs
import torch

if TYPE_CHECKING:
    from blt_decode.model import BLTModel
    from blt_decode.session import DecodeSession


@attrs.frozen
class DecodeContext:
    """What a strategy knows about the request besides its options."""

    prompt_ids: tuple[int, ...]  #: BOS followed by the prompt's byte ids
    max_new_bytes: int
    generator: torch.Generator  #: seeded random source for sampling strategies


@runtime_checkable
class Strategy(Protocol):
    name: ClassVar[str]
    description: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]]
    Options: ClassVar[type]

    def lookahead(self, options: Any) -> int: ...

    def decode(self, session: "DecodeSession", context: DecodeContext, options: Any) -> Iterator[Sequence[int]]: ...


@runtime_checkable
class Backend(Protocol):
    name: ClassVar[str]
    description: ClassVar[str]

    def open_session(self, model: "BLTModel", capacity: int) -> "DecodeSession": ...

    # optional: ``runner(model) -> Runner`` (or the older ``runners(model) -> StackRunners``) lets the
    # batched engine use the backend
