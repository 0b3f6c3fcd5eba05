"""Structured decoding events: the one mechanism every strategy and the session use to say what happened.

Tracing is off unless a :class:`Trace` is attached to the session (``generate(..., trace=True)``); then
``session.emit(event)`` appends to it. With tracing off, ``emit`` is a single ``is None`` check.

The session emits :class:`PatchClosed`, :class:`GlobalPass`, :class:`Drafted` and :class:`RolledBack`; the
framework emits :class:`Committed`; strategies emit what only they know (:class:`Verified`, :class:`Unmasked`).
"""

from __future__ import annotations

from typing import Any, Union

import attrs


@attrs.frozen
class PatchClosed:
    """Patch [start, end) closed; ``entropy`` is H(end-1) when the entropy rule closed it, else None
    (BOS, forced by max_patch_length, or static patching)."""

    start: int
    end: int
    entropy: float | None


@attrs.frozen
class GlobalPass:
    """One global-model pass over ``count`` newly closed patches starting at patch index ``first``."""

    first: int
    count: int


@attrs.frozen
class Drafted:
    """Decoder-only draft of ``ids`` at ``position`` (stale latent)."""

    position: int
    ids: tuple[int, ...]


@attrs.frozen
class RolledBack:
    """The session was truncated to its first ``length`` ids (a verification rejected drafts): drafts and
    any patch that closed past ``length`` are gone, though their passes ran (:meth:`Trace.patches` replays it)."""

    length: int


@attrs.frozen
class Verified:
    """A verification pass over ``drafted`` (starting at ``position``) kept the first ``accepted`` ids.
    ``k`` is the draft length the round chose (BLT-S ``k``, BLT-DV ``block_size - 1``; with ``auto`` it
    changes from round to round); ``drafted`` holds fewer guesses when the draft ended at EOS."""

    position: int
    drafted: tuple[int, ...]
    accepted: int
    k: int | None = None


@attrs.frozen
class Unmasked:
    """One diffusion pass of the block at ``block_start`` unmasked ``positions`` (absolute) as ``ids``
    with the given top-1 probabilities."""

    block_start: int
    step: int
    positions: tuple[int, ...]
    ids: tuple[int, ...]
    confidences: tuple[float, ...]


@attrs.frozen
class Committed:
    """The framework committed ``ids`` at ``position`` (what the user sees streamed)."""

    position: int
    ids: tuple[int, ...]


Event = Union[PatchClosed, GlobalPass, Drafted, RolledBack, Verified, Unmasked, Committed]


@attrs.define
class Trace:
    """The events of one traced generation, in the order they were emitted; :meth:`of_type` picks one kind."""

    events: list[Any] = attrs.field(factory=list)

    def emit(self, event: Any) -> None:
        self.events.append(event)

    def of_type(self, kind: type) -> list[Any]:
        """The events of class ``kind``, in order."""
        return [e for e in self.events if isinstance(e, kind)]

    def patches(self) -> list[PatchClosed]:
        """The closed patches of the final sequence: every :class:`PatchClosed` but those a later
        :class:`RolledBack` discarded (a verification chunk can close patches past the bytes it keeps)."""
        kept: list[PatchClosed] = []
        for event in self.events:
            if isinstance(event, PatchClosed):
                kept.append(event)
            elif isinstance(event, RolledBack):
                kept = [p for p in kept if p.end <= event.length]
        return kept
