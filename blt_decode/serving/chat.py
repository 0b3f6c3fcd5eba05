"""Chat templates: how ``/v1/chat/completions`` turns a list of messages into one prompt.

A template is a Jinja2 text in the convention of Hugging Face's ``chat_template`` (variables
``messages``, each with ``role`` and ``content``, ``add_generation_prompt``, ``bos_token`` and
``eos_token``), rendered in Jinja2's sandbox. ``blt-decode serve --chat-template FILE`` reads one;
without it the server uses :data:`PLAIN`, a plain transcript for base models::

    System text

    User: the question

    Assistant:

with ``"\\nUser:"`` as a stop sequence, so that a base model does not go on to write the user's next
turn. A template file has no stop sequences unless ``--chat-stop`` gives some.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import attrs

from blt_decode.errors import BLTDecodeError

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


class ChatTemplateError(BLTDecodeError):
    """A chat template that cannot be read or compiled, or messages it cannot render."""


@attrs.frozen
class ChatTemplate:
    """A compiled chat template, its source (shown to clients in ``/tokenizer_info``) and the stop
    sequences every chat request gets (before the request's own)."""

    source: str
    stops: tuple[str, ...] = ()
    name: str = "plain"
    _compiled: Any = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        try:
            compiled = ImmutableSandboxedEnvironment(keep_trailing_newline=True).from_string(self.source)
        except TemplateError as exc:
            raise ChatTemplateError(f"chat template {self.name}: {exc}") from None
        object.__setattr__(self, "_compiled", compiled)

    @classmethod
    def from_file(cls, path: str | Path, stops: Sequence[str] = ()) -> "ChatTemplate":
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ChatTemplateError(f"cannot read the chat template {path}: {exc.strerror or exc}") from None
        if len(data) > MAX_TEMPLATE_BYTES:
            raise ChatTemplateError(f"the chat template {path} has {len(data)} bytes; at most {MAX_TEMPLATE_BYTES}")
        try:
            source = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ChatTemplateError(f"the chat template {path} is not UTF-8 text") from None
        return cls(source, tuple(stops), name=str(path))

    def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt for ``messages`` (each a ``role`` and a text ``content``)."""
        from jinja2 import TemplateError

        try:
            return self._compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         bos_token="", eos_token="")
        except TemplateError as exc:
            raise ChatTemplateError(f"chat template {self.name} failed on these messages: {exc}") from None


PLAIN = ChatTemplate(PLAIN_SOURCE, ("\nUser:",))
