"""Chat templates rendered in a child process that the server can kill: the time and memory bound.

A Jinja2 template is a program: nested loops, recursive macros or string repetition run for as long or
grow as large as they like, and a render in a thread cannot be stopped. The server therefore renders in
this script, run as its own process (by path, so that it imports only the standard library and Jinja2,
not torch): the parent kills it when a render passes its deadline and starts a new one; an address-space
limit (``RLIMIT_AS``) turns a memory bomb into a ``MemoryError`` here; the output is generated in pieces
(``template.generate()``) and refused as soon as it passes its size limit.

Protocol, one JSON object a line: the parent sends ``{"source", "max_bytes", "memory_bytes"}`` (answered
``{"ready": true}`` or ``{"error": ...}``), then per render ``{"messages", "add_generation_prompt"}``,
answered ``{"text": ...}`` or ``{"error": ...}`` (``"fatal": true`` when this process should be replaced).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any, Iterable

#: how often the watchdog thread looks for its parent (a worker must not outlive its server)
PARENT_CHECK_S = 0.5


class RenderError(Exception):
    """A template failed on these messages (its message is one line for the client)."""


def _raise_exception(message: Any = "") -> None:
    # Hugging Face's chat templates call raise_exception('...') to refuse a conversation
    from jinja2 import TemplateError

    raise TemplateError(str(message))


def _finalize_at_run_time(context: Any, value: Any) -> Any:
    return value


def environment() -> Any:
    """Jinja2's immutable sandbox (no attribute of Python's internals, no mutation of what it is given,
    ranges of at most 100 000 items) with Hugging Face's ``raise_exception``, and nothing evaluated at
    compile time: Jinja2 folds constant expressions when it compiles (``{{ 'x' * 10**10 }}`` would be
    computed by whoever compiles the template, the server itself); without its optimizer, with the
    arithmetic operators intercepted and a finalize that needs the render's context, every expression is
    left to the render, in the worker."""
    from jinja2 import pass_context
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Environment(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"+", "-", "*", "/", "//", "%", "**"})
        intercepted_unops = frozenset({"+", "-"})

    env = Environment(keep_trailing_newline=True, optimized=False, finalize=pass_context(_finalize_at_run_time))
    env.globals["raise_exception"] = _raise_exception
    return env


def describe(exc: BaseException) -> str:
    """One line for the client: what went wrong in the template, without Python's exception names."""
    from jinja2 import TemplateError

    if isinstance(exc, RenderError):
        return str(exc)
    if isinstance(exc, RecursionError):
        return "it recursed too deeply"
    if isinstance(exc, MemoryError):
        return "it ran out of memory"
    if isinstance(exc, KeyError):
        return f"no key {exc}"
    text = " ".join(str(exc).split()) or "it raised an error without a message"
    return text if isinstance(exc, TemplateError) else f"it failed: {text}"


def render(template: Any, messages: list[dict[str, Any]], add_generation_prompt: bool, max_bytes: int) -> str:
    """The template's text, generated piece by piece and refused once it passes ``max_bytes`` (UTF-8)."""
    pieces: list[str] = []
    size = 0
    chunks: Iterable[str] = template.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                              bos_token="", eos_token="")
    for chunk in chunks:
        size += len(chunk.encode("utf-8", "surrogatepass"))
        if size > max_bytes:
            raise RenderError(f"it rendered more than {max_bytes} bytes (the most a prompt may have)")
        pieces.append(chunk)
    return "".join(pieces)


def _watch_parent(parent: int) -> None:
    # a render stuck in a loop never reads stdin again: without this a dead server's worker would spin on
    while True:
        time.sleep(PARENT_CHECK_S)
        if os.getppid() != parent:
            os._exit(1)


def _reply(out: Any, **fields: Any) -> None:
    out.write(json.dumps(fields, ensure_ascii=True).encode() + b"\n")
    out.flush()


def main() -> int:
    """The worker: the protocol above on stdin/stdout until stdin ends (0), or 1 after a template that does
    not compile or a render that ran out of memory; exits if its parent goes away."""
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    config = json.loads(stdin.readline() or b"{}")
    memory = int(config.get("memory_bytes", 0))
    if memory > 0:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    sys.setrecursionlimit(1000)
    try:
        template = environment().from_string(config["source"])
    except Exception as exc:
        _reply(stdout, error=describe(exc))
        return 1
    max_bytes = int(config["max_bytes"])
    _reply(stdout, ready=True)
    for line in stdin:
        try:
            job = json.loads(line)
            text = render(template, job["messages"], bool(job["add_generation_prompt"]), max_bytes)
        except MemoryError:
            _reply(stdout, error=describe(MemoryError()), fatal=True)
            return 1
        except Exception as exc:
            _reply(stdout, error=describe(exc))
            continue
        _reply(stdout, text=text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
