"""From the engine's thread to an asyncio event loop, and from bytes to the text of a choice
(docs/serving.md, "Design")."""

from __future__ import annotations

import asyncio
import codecs
import collections
import threading
from typing import AsyncIterator, Callable, Sequence

from blt_decode.decoding.stops import StopMatcher
from blt_decode.engine.core import Engine, EngineStream
from blt_decode.engine.request import Request
from blt_decode.errors import EngineStoppedError

#: how often a request with nothing new checks that the engine's thread still runs (seconds)
ENGINE_CHECK_S = 5.0


class ChoiceText:
    """The text of one choice as its bytes arrive (:meth:`feed`), and its end (:meth:`finish`)."""

    def __init__(self, stops: Sequence[bytes], include_stop: bool = False):
        self.stops = tuple(stops)
        self.include_stop = include_stop
        self.out = bytearray()
        self.released = 0
        self.end: int | None = None  #: length of the returned bytes, once finished
        self._stops = StopMatcher(self.stops)  # linear in the output, whatever the stop list
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def _held(self) -> int:
        """Bytes at the end that begin some stop sequence (which may yet complete it) or are a whole one
        (which ends the request: :meth:`finish` drops it)."""
        return 0 if self.include_stop else self._stops.pending

    def _release(self, upto: int) -> str:
        if upto <= self.released:
            return ""
        data = bytes(self.out[self.released:upto])
        self.released = upto
        return self._decoder.decode(data)

    def feed(self, chunk: bytes) -> str:
        """Text that can be shown now (possibly empty)."""
        self.out += chunk
        self._stops.feed(chunk)
        return self._release(len(self.out) - self._held())

    def finish(self, stop_reason: str) -> str:
        """The rest of the text; a stop sequence that ended the request is dropped (the longest one the
        output ends with) unless ``include_stop``."""
        end = len(self.out)
        if stop_reason == "stop_sequence" and not self.include_stop:
            end -= self._stops.ended
        # held-back bytes always cover a stop sequence's start, so nothing shown must be taken back
        self.end = max(end, self.released)
        return self._release(self.end) + self._decoder.decode(b"", final=True)

    @property
    def returned(self) -> bytes:
        """The bytes whose text was returned (the output less the stop sequence), once finished."""
        return bytes(self.out[: self.end if self.end is not None else self.released])


class RequestStreams:
    """The engine streams of one HTTP request (one per prompt), followed from the event loop."""

    def __init__(self, engine: Engine, requests: Sequence[Request]):
        self.engine = engine
        self.requests = list(requests)
        self.queues: list[collections.deque[bytes | None]] = [collections.deque() for _ in self.requests]
        self.streams: list[EngineStream] = []
        self.finished = [False] * len(self.requests)
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()
        self._wake_scheduled = False
        self._lock = threading.Lock()  # self.streams and self._abandoned, shared with the submitting thread
        self._abandoned = False

    def _wake(self) -> None:  # on the loop
        self._wake_scheduled = False
        self._event.set()

    def _listener(self, index: int) -> Callable[[bytes | None], None]:
        queue = self.queues[index]

        def listener(chunk: bytes | None) -> None:  # on the engine's thread: append, wake the loop once
            queue.append(chunk)
            if not self._wake_scheduled:
                self._wake_scheduled = True
                self._loop.call_soon_threadsafe(self._wake)

        return listener

    async def submit(self) -> None:
        """Queue every prompt (in a worker thread: the engine's lock may be held for a step)."""

        def submit_all() -> None:
            streams = [self.engine.submit_request(r, listener=self._listener(i)) for i, r in enumerate(self.requests)]
            with self._lock:
                self.streams, abandoned = streams, self._abandoned
            if abandoned:  # the client left while they were being queued
                for stream in streams:
                    stream.cancel()

        await asyncio.to_thread(submit_all)

    async def events(self) -> AsyncIterator[tuple[int, bytes | None]]:
        """``(index, chunk)`` as chunks arrive, ``(index, None)`` when that request has ended."""
        while not all(self.finished):
            self._event.clear()  # before draining: a chunk appended after the drain sets it again
            for index, queue in enumerate(self.queues):
                while queue and not self.finished[index]:
                    chunk = queue.popleft()
                    if chunk is None:
                        self.finished[index] = True
                    yield index, chunk
            if not all(self.finished):
                try:
                    await asyncio.wait_for(self._event.wait(), ENGINE_CHECK_S)
                except asyncio.TimeoutError:
                    # a request may wait long for a slot; but if the engine's thread died (a failure
                    # outside any one request), nothing will ever come: fail instead of hanging
                    if not self.engine.running:
                        raise EngineStoppedError("the engine has stopped; no more output will come") from None

    def cancel_unfinished(self) -> None:
        """Cancel the requests that have not ended (a client that left). Never awaits and never waits for
        the engine (cancelling only sets a flag), so that it can run in a ``finally`` of a cancelled task."""
        with self._lock:
            self._abandoned = True
            streams = list(self.streams)
        for stream, done in zip(streams, self.finished):
            if not done and not stream.done:
                stream.cancel()
