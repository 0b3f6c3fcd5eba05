"""Stop sequences found in time linear in the output: one Aho-Corasick automaton per stop list (why, and
how the engine and the server use it: docs/serving.md, "Design")."""

from __future__ import annotations

import collections
import functools
from typing import Sequence


class StopAutomaton:
    """The trie of the stop sequences with failure links (immutable once built; shared by every
    :class:`StopMatcher` over the same stops). Built in time linear in their total length."""

    def __init__(self, stops: Sequence[bytes]):
        self.goto: list[dict[int, int]] = [{}]
        self.depth = [0]  #: length of the stop-sequence prefix each state stands for
        self.ends = [0]  #: length of the longest stop sequence ending at each state (0: none)
        for stop in stops:
            state = 0
            for byte in stop:
                nxt = self.goto[state].get(byte)
                if nxt is None:
                    nxt = len(self.goto)
                    self.goto[state][byte] = nxt
                    self.goto.append({})
                    self.depth.append(self.depth[state] + 1)
                    self.ends.append(0)
                state = nxt
            self.ends[state] = len(stop)
        self.fail = [0] * len(self.goto)
        queue = collections.deque(self.goto[0].values())  # depth-1 states fail to the root
        while queue:  # breadth first: a state's failure target is shallower, so already final
            state = queue.popleft()
            self.ends[state] = max(self.ends[state], self.ends[self.fail[state]])
            for byte, child in self.goto[state].items():
                self.fail[child] = self._next(self.fail[state], byte)
                queue.append(child)

    def _next(self, state: int, byte: int) -> int:
        while state and byte not in self.goto[state]:
            state = self.fail[state]
        return self.goto[state].get(byte, 0)


@functools.lru_cache(maxsize=64)
def automaton(stops: tuple[bytes, ...]) -> StopAutomaton:
    """The automaton of ``stops``, built once per distinct stop list (every prompt of a request, and the
    engine's and the server's view of it, share one)."""
    return StopAutomaton(stops)


class StopMatcher:
    """Follows one output byte by byte (amortised O(1) per byte, whatever the stop list)."""

    def __init__(self, stops: Sequence[bytes]):
        self.automaton = automaton(tuple(stops))
        self.state = 0

    def feed(self, data: bytes | bytearray) -> None:
        """Read more output."""
        machine, state = self.automaton, self.state
        for byte in data:
            state = machine._next(state, byte)
        self.state = state

    @property
    def ended(self) -> int:
        """Length of the longest stop sequence the output read so far ends with (0: none)."""
        return self.automaton.ends[self.state]

    @property
    def pending(self) -> int:
        """Length of the longest end of the output that is the start of a stop sequence (or a whole one):
        the bytes that may yet turn out to be a stop sequence."""
        return self.automaton.depth[self.state]
