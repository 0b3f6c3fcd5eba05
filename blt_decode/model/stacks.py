"""The four transformer stacks of a BLT, one name each, and the records that hold one value per stack."""

from __future__ import annotations

import enum
from typing import Any, Iterator

import attrs


class Stack(enum.Enum):
    """A transformer stack, in the order a byte passes them. Its ``value`` is its name everywhere (pass
    counts, parameter counts, the engine's tally, runners, caches); ``attr`` is that name as a Python field
    (``global`` is a keyword). A new stack is one member here; every per-stack record follows."""

    PATCHER = "patcher"  # the entropy model: decides where patches end
    ENCODER = "encoder"  # local encoder: byte states, patch summaries
    GLOBAL = "global"  # global transformer: one latent per closed patch
    DECODER = "decoder"  # local decoder: next-byte logits

    @property
    def attr(self) -> str:
        return self.value + "_" if self is Stack.GLOBAL else self.value

    def __str__(self) -> str:
        return self.value


class PerStack:
    """Base of the records built by :func:`per_stack`: read a value by :class:`Stack`, iterate the pairs."""

    def __getitem__(self, stack: Stack) -> Any:
        return getattr(self, stack.attr)

    def items(self) -> Iterator[tuple[Stack, Any]]:
        return ((stack, getattr(self, stack.attr)) for stack in Stack)


def per_stack(name: str, doc: str, module: str, **field: Any) -> type:
    """A frozen attrs record with one field per :class:`Stack` (named by ``Stack.attr``, in stack order,
    each made with ``attrs.field(**field)``), so that a new stack needs no edit here or in the record."""
    cls = attrs.make_class(name, {stack.attr: attrs.field(**field) for stack in Stack}, bases=(PerStack,),
                           frozen=True)
    cls.__doc__, cls.__module__ = doc, module
    return cls
