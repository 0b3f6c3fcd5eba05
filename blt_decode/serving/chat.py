"""Chat templates: how ``/v1/chat/completions`` turns a list of messages into one prompt, rendered in worker
processes under limits (docs/serving.md, "Chat")."""

from __future__ import annotations

import asyncio
import json
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import attrs

from blt_decode.errors import BLTDecodeError, ChatTemplateBusyError, ChatTemplateError
from blt_decode.serving import template_worker

PLAIN_SOURCE = (
    "{% for message in messages %}"
    "{% if message.role == 'system' %}{{ message.content }}\n\n"
    "{% elif message.role == 'user' %}User: {{ message.content }}\n\n"
    "{% elif message.role == 'assistant' %}Assistant: {{ message.content }}\n\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
#: most bytes of a template file
MAX_TEMPLATE_BYTES = 1 << 16
#: the conversation a template must render at start-up (every role a request may send, after mapping)
SAMPLE_MESSAGES = (
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "Hello. How can I help?"},
    {"role": "user", "content": "Write a function that adds two numbers."},
)


@attrs.frozen
class RenderLimits:
    """How far one render of a chat template may go in the server (docs/serving.md)."""

    #: seconds a render may take (its worker is killed after that); also the longest wait for a free worker
    timeout_s: float = attrs.field(default=5.0, validator=attrs.validators.gt(0))
    #: most UTF-8 bytes of a rendered prompt (a prompt can never be longer than the request body allows anyway)
    max_bytes: int = attrs.field(default=1 << 20, validator=attrs.validators.gt(0))
    #: address-space limit of a worker process (RLIMIT_AS): a memory bomb is a MemoryError there
    memory_bytes: int = attrs.field(default=1 << 30, validator=attrs.validators.ge(64 << 20))
    #: renders at once (worker processes)
    workers: int = attrs.field(default=2, validator=attrs.validators.in_(range(1, 65)))
    #: seconds a worker may take to start (Python and Jinja2), not counted in timeout_s
    start_timeout_s: float = attrs.field(default=60.0, validator=attrs.validators.gt(0))


def _environment() -> Any:
    return template_worker.environment()


@attrs.frozen
class ChatTemplate:
    """A compiled chat template, its source (shown to clients in ``/tokenizer_info``) and the stop
    sequences every chat request gets (before the request's own)."""

    source: str
    stops: tuple[str, ...] = ()
    name: str = "plain"
    _compiled: Any = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        from blt_decode.engine.request import stop_sequences

        try:  # the limits every request's stops have: a bad one would fail every chat request later
            if self.stops:
                stop_sequences(list(self.stops))
        except BLTDecodeError as exc:
            raise ChatTemplateError(f"the chat stop sequences (--chat-stop): {exc}") from None
        try:
            compiled = _environment().from_string(self.source)
        except Exception as exc:  # a TemplateSyntaxError, or a RecursionError on absurdly nested source
            raise ChatTemplateError(f"chat template {self.name}: {template_worker.describe(exc)}") from None
        object.__setattr__(self, "_compiled", compiled)

    @classmethod
    def from_file(cls, path: str | Path, stops: Sequence[str] = ()) -> "ChatTemplate":
        path = Path(path)
        try:
            with path.open("rb") as fh:  # at most one byte past the limit: /dev/zero is not read to the end
                data = fh.read(MAX_TEMPLATE_BYTES + 1)
        except OSError as exc:
            raise ChatTemplateError(f"cannot read the chat template {path}: {exc.strerror or exc}") from None
        if len(data) > MAX_TEMPLATE_BYTES:
            raise ChatTemplateError(f"the chat template {path} has more than {MAX_TEMPLATE_BYTES} bytes, the most read")
        try:
            source = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ChatTemplateError(f"the chat template {path} is not UTF-8 text") from None
        return cls(source, tuple(stops), name=str(path))

    def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True,
               max_bytes: int = RenderLimits().max_bytes) -> str:
        """The prompt for ``messages`` (each a ``role`` and a text ``content``), rendered in this thread:
        for templates one trusts (tests, scripts). The server renders with :class:`TemplateRenderer`."""
        try:
            return template_worker.render(self._compiled, list(messages), add_generation_prompt, max_bytes)
        except Exception as exc:
            raise ChatTemplateError(f"chat template {self.name} failed on these messages: "
                                    f"{template_worker.describe(exc)}") from None

    def check(self, limits: RenderLimits = RenderLimits()) -> None:
        """Render :data:`SAMPLE_MESSAGES` as the server would (a worker process, ``limits``), or
        :class:`ChatTemplateError` saying why not: a template that cannot render an ordinary conversation
        is refused at start-up, not on every request."""
        renderer = TemplateRenderer(self, limits)
        try:
            renderer.render(SAMPLE_MESSAGES)
        except ChatTemplateError as exc:
            raise ChatTemplateError(f"{exc} (a sample conversation: system, user, assistant, user)") from None
        finally:
            renderer.close()


PLAIN = ChatTemplate(PLAIN_SOURCE, ("\nUser:",))

#: runs the worker script by path with the script's own folder left off sys.path (its neighbours are not
#: imported by mistake) and nothing of blt_decode imported (no torch: a worker starts in a fraction of a second)
_BOOT = "import runpy, sys; del sys.path[0]; runpy.run_path(sys.argv[1], run_name='__main__')"


class _Worker:
    """One worker process with a compiled template; killed when a render passes its deadline."""

    def __init__(self, template: ChatTemplate, limits: RenderLimits):
        self.name = template.name
        self.proc = subprocess.Popen([sys.executable, "-c", _BOOT, template_worker.__file__],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            reply = self.ask({"source": template.source, "max_bytes": limits.max_bytes,
                              "memory_bytes": limits.memory_bytes}, limits.start_timeout_s, starting=True)
        except BaseException:
            self.kill()
            raise
        if "error" in reply:
            self.kill()
            raise ChatTemplateError(f"chat template {self.name}: {reply['error']}")

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def ask(self, job: dict[str, Any], timeout_s: float, starting: bool = False) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps(job).encode() + b"\n")
            self.proc.stdin.flush()
        except OSError:
            raise self._stopped() from None
        assert self.proc.stdout is not None
        fd, buffer = self.proc.stdout.fileno(), bytearray()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.kill()
                if starting:
                    raise ChatTemplateError(f"the chat template worker did not start within {timeout_s} s")
                raise ChatTemplateError(f"chat template {self.name} took longer than {timeout_s:g} s on these "
                                        "messages and was stopped")
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
            data = os.read(fd, 1 << 16)
            if not data:
                raise self._stopped()
            buffer += data
            end = buffer.find(b"\n")
            if end >= 0:
                return json.loads(bytes(buffer[:end]))

    def _stopped(self) -> ChatTemplateError:
        self.kill()
        return ChatTemplateError(f"chat template {self.name} failed on these messages: its worker stopped "
                                 "(out of memory?)")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass


class TemplateRenderer:
    """Renders one :class:`ChatTemplate` in up to ``limits.workers`` worker processes under ``limits``.
    A worker that passes the time limit (or runs out of memory) is killed and replaced on the next render;
    idle workers are kept. :meth:`render_async` is the server's: waiting for a free worker holds no thread."""

    def __init__(self, template: ChatTemplate, limits: RenderLimits = RenderLimits()):
        self.template, self.limits = template, limits
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()
        self._slots: asyncio.Semaphore | None = None
        self._closed = False

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt, or :class:`ChatTemplateError` (the template failed, passed a limit or timed out)."""
        with self._lock:
            if self._closed:
                raise ChatTemplateError("the chat template renderer is closed")
            worker = self._idle.pop() if self._idle else None
        if worker is None or not worker.alive:
            worker = _Worker(self.template, self.limits)
        reply = worker.ask({"messages": list(messages), "add_generation_prompt": add_generation_prompt},
                           self.limits.timeout_s)
        if reply.get("fatal"):
            worker.kill()
        else:
            with self._lock:
                if self._closed:
                    worker.kill()
                else:
                    self._idle.append(worker)
        if "error" in reply:
            raise ChatTemplateError(f"chat template {self.template.name} failed on these messages: {reply['error']}")
        return str(reply["text"])

    async def render_async(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """:meth:`render` in a worker thread, at most ``limits.workers`` at once; a request that finds
        every worker busy for ``timeout_s`` gets :class:`ChatTemplateBusyError`."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.limits.workers)
        try:
            await asyncio.wait_for(self._slots.acquire(), self.limits.timeout_s)
        except (asyncio.TimeoutError, TimeoutError):
            raise ChatTemplateBusyError(f"every chat template worker ({self.limits.workers}) stayed busy for "
                                        f"{self.limits.timeout_s:g} s; try again") from None
        try:
            return await asyncio.to_thread(self.render, messages, add_generation_prompt)
        finally:
            self._slots.release()

    def close(self) -> None:
        """Stop every idle worker (a busy one is killed when its render returns)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.kill()
