"""The decoding protocol: what a strategy and a backend are. This module is the one statement of the
contract (:class:`Strategy`, :class:`Backend`, :class:`DecodeContext`); the hook specifications, the
registry's refusals and docs/plugins.md point here. :class:`BaseStrategy` gives a strategy its defaults.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Protocol, Sequence, runtime_checkable

import attrs
import torch

if TYPE_CHECKING:
    from blt_decode.decoding.session import DecodeSession
    from blt_decode.execution.runner import Runner
    from blt_decode.model.blt import BLTModel


@attrs.frozen
class DecodeContext:
    """What a strategy knows about the request besides its options."""

    prompt_ids: tuple[int, ...]  #: BOS followed by the prompt's byte ids
    max_new_bytes: int  #: the framework stops there; a strategy may read it to avoid drafting waste
    generator: torch.Generator  #: the request's seeded random source: every random draw uses it


@runtime_checkable
class Strategy(Protocol):
    """A decoding strategy decides *which* ids to commit. It touches the model only through the
    :class:`~blt_decode.decoding.session.DecodeSession` primitives it is given (docs/plugins.md lists them) and
    never imports another strategy; :class:`BaseStrategy` supplies ``aliases``, ``Options``,
    ``lookahead`` and ``description`` by default."""

    #: the name users type (``--strategy NAME``)
    name: ClassVar[str]
    #: one line, shown by ``blt-decode strategies``
    description: ClassVar[str]
    #: other names, e.g. ``("ar",)``; may be empty
    aliases: ClassVar[tuple[str, ...]]
    #: an attrs class whose fields are the options; constructing it validates them
    Options: ClassVar[type]

    def lookahead(self, options: Any) -> int:
        """How many positions past the committed sequence the strategy may write at once (drafts,
        diffusion blocks), an integer >= 0; the session is sized for it."""

    def decode(self, session: "DecodeSession", context: DecodeContext, options: Any) -> Iterator[Sequence[int]]:
        """A generator yielding the token ids it *commits*, in chunks (one id for autoregressive decoding,
        an accepted run for speculative ones): lists of ints, byte ids or EOS. The framework turns them
        into bytes, stops at EOS, stop sequences and ``max_new_bytes``, and closes the generator; it
        refuses anything else, and 64 empty chunks in a row, with a
        :class:`~blt_decode.errors.StrategyError` naming the strategy."""


@runtime_checkable
class Backend(Protocol):
    """A backend decides *how* the model runs: it gives the runner that executes the sessions' primitive
    calls, for one sequence and for the batched engine alike; the framework builds the sessions over it
    (:func:`~blt_decode.decoding.session.open_session`). Strategies never see which backend runs them.

    Optional besides: ``aliases`` (a tuple of other names) and ``warmup(model, *, rows, progress)``, which prepares batches of up to ``max(rows)`` sequences (and lone ones if 1 is in ``rows``)
    before the first request, with a progress bar on stderr if ``progress``
    (:func:`~blt_decode.plugins.registry.warm_up` calls and times it; its return value is ignored)."""

    name: ClassVar[str]
    description: ClassVar[str]

    def runner(self, model: "BLTModel") -> "Runner":
        """The runner of ``model`` (:class:`~blt_decode.execution.runner.Runner`: ``new_state(slots,
        capacity)`` and ``run(state, calls, tally) -> [CallResult]``); it may be shared by every session
        and engine of that model."""


@attrs.frozen
class NoOptions:
    """The options of a strategy that has none."""


def _summary(doc: str | None) -> str | None:
    """A docstring's first paragraph as one line."""
    text = inspect.cleandoc(doc or "").split("\n\n")[0]
    return " ".join(text.split()) or None


class BaseStrategy:
    """Optional base class of a strategy: no aliases, no options (:class:`NoOptions`), lookahead 0, and
    the docstring's first paragraph as ``description``. A subclass sets ``name`` and writes ``decode``;
    it overrides whichever of the others it needs."""

    aliases: ClassVar[tuple[str, ...]] = ()
    Options: ClassVar[type] = NoOptions

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "description" not in cls.__dict__:
            summary = _summary(cls.__dict__.get("__doc__"))
            if summary is not None:  # without one the registry refuses the strategy, naming description
                cls.description = summary

    def lookahead(self, options: Any) -> int:
        return 0
