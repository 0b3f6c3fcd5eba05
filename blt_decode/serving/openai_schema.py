"""The OpenAI completions API as pydantic models, and how a request maps onto blt-decode requests (the
fields: docs/serving.md, "The API")."""

from __future__ import annotations

from typing import Any

import attrs
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from blt_decode.plugins import registry as plugins
from blt_decode.errors import (
    BLTDecodeError,
    ChatTemplateBusyError,
    ChatTemplateError,
    InvalidOptionsError,
    InvalidRequestError,
    PromptTooLongError,
    UnknownStrategyError,
)
from blt_decode.api import MAX_TOP_LOGPROBS
from blt_decode.engine.request import DEFAULT_MAX_NEW_BYTES, MAX_STOP_SEQUENCES, Request
from blt_decode.serving import tokens

#: most prompts in one request (each is a request of its own in the engine)
MAX_PROMPTS = 256

#: OpenAI sampling fields that map onto strategy options of the same name -> the value that changes nothing
SAMPLING_FIELDS = {"temperature": 0.0, "top_p": 1.0}

#: OpenAI fields accepted only at their neutral value (what leaving them out means)
UNSUPPORTED_FIELDS = {
    "n": 1, "best_of": 1, "presence_penalty": 0.0, "frequency_penalty": 0.0, "logit_bias": {}, "suffix": None,
}
#: most messages of a chat request
MAX_MESSAGES = 4096


class StartedPrompt(bytes):
    """A prompt sent as API token ids that began with the sequence start (256): echo shows that token."""


@attrs.frozen
class APIError(Exception):
    """An OpenAI-style error response: HTTP ``status`` and the ``error`` object's fields."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def __str__(self) -> str:
        return self.message


class StreamOptions(BaseModel):
    """A request's ``stream_options`` (only with ``stream``): ``include_usage`` adds a last chunk with the
    usage before ``[DONE]``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False


class _RequestFields(BaseModel):
    """The fields completions and chat requests share (OpenAI's, then blt-decode's extra ones)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    max_tokens: int | None = Field(None, description="new bytes at most (max_new_bytes)")
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # accepted at their neutral value only (UNSUPPORTED_FIELDS)
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # blt-decode's extra body fields
    strategy: str = Field("autoregressive", description="decoding strategy by name (see GET /v1/models)")
    strategy_options: dict[str, Any] = Field(default_factory=dict, description="the strategy's options")
    include_stop_str_in_output: bool = False


class CompletionRequest(_RequestFields):
    """The body of ``POST /v1/completions``."""

    prompt: Any = Field(description="a string, a list of strings, a list of byte values 0..255, or a list of those")
    echo: bool = False
    logprobs: int | None = Field(None, description="alternatives per byte to report (0..20)")
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="plain")
    @classmethod
    def _prompt(cls, value: Any) -> list[str | bytes]:
        """The prompts, each a str or raw bytes (:class:`StartedPrompt` when sent after the start token)."""
        def raw(ids: list[Any]) -> bytes:
            started = bool(ids) and ids[0] == tokens.BOS and not isinstance(ids[0], bool)
            body = ids[1:] if started else ids
            if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i <= 255 for i in body):
                raise ValueError("a prompt given as a list of integers holds byte values 0..255 (bytes are the tokens), "
                                 f"optionally after {tokens.BOS} (the sequence start)")
            return StartedPrompt(body) if started else bytes(body)

        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and value:
            if all(isinstance(p, str) for p in value):
                return list(value)
            if all(isinstance(p, list) for p in value):
                return [raw(p) for p in value]
            if not any(isinstance(p, (str, list)) for p in value):
                return [raw(value)]
        if isinstance(value, list) and not value:
            raise ValueError("prompt is an empty list; give at least one prompt (\"\" is an empty prompt)")
        raise ValueError("prompt must be a string, a list of strings, a list of byte values 0..255, or a list of such lists")


def parse_request(body: bytes) -> CompletionRequest:
    """The request body parsed, or :class:`APIError`: 400 for JSON that is not an object or a field that
    does not exist, 422 for a field of the wrong type."""
    return _parse(CompletionRequest, body)


def _parse(model: Any, body: bytes) -> Any:
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        first = errors[0]
        kind, loc = first["type"], ".".join(str(p) for p in first["loc"])
        if kind == "json_invalid":
            raise APIError(400, f"the body is not valid JSON: {first['ctx'].get('error', first['msg'])}",
                           code="invalid_json") from None
        if kind == "model_type" and not first["loc"]:
            raise APIError(400, "the body must be a JSON object", code="invalid_json") from None
        unknown = [".".join(map(str, e["loc"])) for e in errors if e["type"] == "extra_forbidden"]
        if unknown:
            raise APIError(400, f"unrecognized request argument(s): {', '.join(unknown)}", param=unknown[0],
                           code="unknown_parameter") from None
        message = first["msg"].removeprefix("Value error, ")
        if kind == "missing":
            message = "this field is required"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        where = "" if message.startswith(loc) else f"{loc}: "
        raise APIError(422, f"{where}{message}{more}", param=loc, code="invalid_type") from None


def _check_unsupported(body: CompletionRequest) -> None:
    for name, neutral in UNSUPPORTED_FIELDS.items():
        value = getattr(body, name)
        if value is not None and value != neutral:
            raise APIError(400, f"{name}={value!r} is not supported by blt-decode (leave it out or use {neutral!r})",
                           param=name, code="unsupported_parameter")


def strategy_options(body: CompletionRequest) -> dict[str, Any]:
    """``strategy_options`` with ``temperature``/``top_p`` folded in where the strategy has them, or
    :class:`APIError` for a sampling field the strategy does not take (unless it is neutral) or that
    contradicts ``strategy_options``. Unknown strategies raise :class:`UnknownStrategyError`."""
    strategy = plugins.get_strategy(body.strategy)
    fields = {f.name for f in attrs.fields(strategy.Options)}
    options = dict(body.strategy_options)
    for name, neutral in SAMPLING_FIELDS.items():
        value = getattr(body, name)
        if value is None:
            continue
        if name in fields:
            if name in options and options[name] != value:
                raise APIError(400, f"{name}={value!r} contradicts strategy_options.{name}={options[name]!r}; give it once",
                               param=name, code="invalid_value")
            options[name] = value
        elif value != neutral:
            takers = sorted({s.name for s in plugins.strategies().values()
                             if name in {f.name for f in attrs.fields(s.Options)}})
            raise APIError(
                400, f"strategy {strategy.name!r} has no option {name!r} (its options: {', '.join(sorted(fields)) or 'none'}); "
                f"leave {name} out (or {neutral}) or use a strategy that has it: {', '.join(takers) or 'none'}",
                param=name, code="unsupported_parameter")
    return options


def to_requests(body: CompletionRequest) -> list[Request]:
    """One :class:`Request` per prompt (not yet validated against the model: :func:`prepare` does that)."""
    _check_unsupported(body)
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options",
                       code="invalid_value")  # as OpenAI answers
    if body.logprobs is not None and not 0 <= body.logprobs <= MAX_TOP_LOGPROBS:
        raise APIError(400, f"logprobs must be an integer in 0..{MAX_TOP_LOGPROBS}, got {body.logprobs}", param="logprobs",
                       code="invalid_value")
    for name, asked in (("logprobs", body.logprobs is not None), ("echo", body.echo)):
        if body.stream and asked:
            raise APIError(400, f"{name} is not supported with stream: true (logprobs are computed once a choice has "
                           "ended); send stream: false", param=name, code="unsupported_parameter")
    prompts: list[str | bytes] = body.prompt
    if len(prompts) > MAX_PROMPTS:
        raise APIError(400, f"{len(prompts)} prompts in one request; at most {MAX_PROMPTS}", param="prompt",
                       code="invalid_value")
    options = strategy_options(body)
    stop = [] if body.stop is None else [body.stop] if isinstance(body.stop, str) else list(body.stop)
    max_new = DEFAULT_MAX_NEW_BYTES if body.max_tokens is None else body.max_tokens
    return [Request(p, strategy=body.strategy, options=options, max_new_bytes=max_new, stop=stop, seed=body.seed)
            for p in prompts]


def _openai_words(message: str) -> str:
    # the validator speaks of max_new_bytes; an OpenAI client sent max_tokens (bytes are the tokens here)
    return message.replace("max_new_bytes", "max_tokens")


def api_error(exc: BLTDecodeError, body: CompletionRequest | None = None) -> APIError:
    """The OpenAI-style error for a typed validation error of blt-decode (all 400s). With the request's
    ``body``, a bad sampling option is blamed on the top-level field the client sent it in."""
    if isinstance(exc, UnknownStrategyError):
        return APIError(400, str(exc), param="strategy", code="unknown_strategy")
    if isinstance(exc, InvalidOptionsError):
        param = "strategy_options"
        if body is not None:
            param = next((name for name in SAMPLING_FIELDS if getattr(body, name) is not None
                          and name not in body.strategy_options and f"option {name!r}" in str(exc)), param)
        return APIError(400, str(exc), param=param, code="invalid_value" if param != "strategy_options" else "invalid_option")
    if isinstance(exc, PromptTooLongError):
        return APIError(400, _openai_words(str(exc)), param="prompt", code="context_length_exceeded")
    if isinstance(exc, InvalidRequestError):
        message = _openai_words(str(exc))
        param = next((p for p in ("max_tokens", "seed", "stop", "prompt") if message.startswith(p)
                      or f" {p} " in message[:40]), None)
        return APIError(400, message, param=param, code="invalid_value")
    return APIError(400, _openai_words(str(exc)), code="invalid_request")


def finish_reason(stop_reason: str) -> str:
    """OpenAI's finish_reason for a DecodeStats.stop_reason: "length" at max_tokens, else "stop"."""
    return "length" if stop_reason == "max_new_bytes" else "stop"


# -- chat -------------------------------------------------------------------------------------------
class ContentPart(BaseModel):
    """One part of a chat message's content. Any part parses; :meth:`ChatMessage.text` accepts only a
    ``text`` part with its text and no other field."""

    # other fields allowed: a part of another type carries its own (image_url, input_audio, ...), and is
    # refused by its type ("text only"), not by the name of its payload
    model_config = ConfigDict(extra="allow", strict=True)

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    """One message of a chat request: its role (checked by :func:`chat_messages`), its content (a string
    or a list of parts) and an optional name."""

    model_config = ConfigDict(extra="forbid", strict=True)

    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self, index: int = 0) -> str:
        """The content as one text (``index``: the message's, for errors)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for j, part in enumerate(self.content):
            where = f"messages[{index}].content[{j}]"
            if part.type != "text":
                shown = part.type if len(part.type) <= 40 else part.type[:40] + "..."
                raise APIError(400, f"{where}: message content of type {shown!r} is not supported (text only)",
                               param="messages", code="unsupported_parameter")
            if part.text is None:
                raise APIError(400, f"{where} is of type 'text' but has no 'text' string", param="messages",
                               code="invalid_value")
            if part.model_extra:
                raise APIError(400, f"unrecognized request argument(s): {', '.join(f'{where}.{k}' for k in part.model_extra)}",
                               param="messages", code="unknown_parameter")
            parts.append(part.text)
        return "".join(parts)


class ChatRequest(_RequestFields):
    """The body of ``POST /v1/chat/completions`` (``max_tokens`` is the older name of
    ``max_completion_tokens``)."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, description="new bytes at most (max_new_bytes)")
    logprobs: bool = False
    top_logprobs: int | None = None


def parse_chat_request(body: bytes) -> ChatRequest:
    """A chat request body parsed, or :class:`APIError` as :func:`parse_request` answers."""
    return _parse(ChatRequest, body)


#: the roles a message may have -> the role the chat template sees (OpenAI's "developer" is its newer name
#: for the system role); anything else is refused rather than left out of the prompt without a word
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def chat_messages(chat: ChatRequest, template: Any) -> list[dict[str, str]]:
    """The messages as the chat template sees them (roles mapped by :data:`CHAT_ROLES`), after every
    check a chat request gets before its render (cheap ones first: a render may take a while), or
    :class:`APIError`: an empty or too long list, a role the server does not render, content that is not
    text, contradicting token limits, ``top_logprobs`` without ``logprobs``, more stops than the limit with
    ``template``'s."""
    if not chat.messages:
        raise APIError(400, "messages is empty; give at least one message", param="messages", code="invalid_value")
    if len(chat.messages) > MAX_MESSAGES:
        raise APIError(400, f"{len(chat.messages)} messages; at most {MAX_MESSAGES}", param="messages", code="invalid_value")
    if chat.max_tokens is not None and chat.max_completion_tokens is not None and chat.max_tokens != chat.max_completion_tokens:
        raise APIError(400, "max_tokens and max_completion_tokens differ; give one", param="max_completion_tokens",
                       code="invalid_value")
    if chat.top_logprobs is not None and not chat.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
    if chat.top_logprobs is not None and not 0 <= chat.top_logprobs <= MAX_TOP_LOGPROBS:
        raise APIError(400, f"top_logprobs must be an integer in 0..{MAX_TOP_LOGPROBS}, got {chat.top_logprobs}",
                       param="top_logprobs", code="invalid_value")
    own = _own_stops(chat)
    if own and len(own) + len(template.stops) > MAX_STOP_SEQUENCES:
        raise APIError(400, f"stop holds {len(own)} sequences and the server adds its {len(template.stops)} chat stop "
                       f"sequences; at most {MAX_STOP_SEQUENCES} are allowed in all", param="stop", code="invalid_value")
    messages = []
    for index, m in enumerate(chat.messages):
        role = CHAT_ROLES.get(m.role)
        if role is None:
            shown = m.role if len(m.role) <= 40 else m.role[:40] + "..."
            raise APIError(400, f"messages[{index}].role is {shown!r}; the roles allowed are {', '.join(CHAT_ROLES)} "
                           "(developer is rendered as system; tool messages are not supported)",
                           param=f"messages.{index}.role", code="invalid_value")
        messages.append({"role": role, "content": m.text(index), **({"name": m.name} if m.name else {})})
    return messages


def _own_stops(chat: ChatRequest) -> list[str]:
    return [] if chat.stop is None else [chat.stop] if isinstance(chat.stop, str) else list(chat.stop)


def chat_to_completion(chat: ChatRequest, template: Any, prompt: str | None = None) -> CompletionRequest:
    """The completion request a chat request amounts to: its messages rendered by ``template`` (a
    :class:`~blt_decode.serving.chat.ChatTemplate`) as the one prompt, the template's stop sequences
    before the request's own. ``prompt``: the messages already checked and rendered (the server renders
    ``chat_messages(chat, template)`` in a worker process); without it they are checked and rendered here,
    in this thread."""
    if prompt is None:
        messages = chat_messages(chat, template)
        try:
            prompt = template.render(messages)
        except ChatTemplateError as exc:
            raise chat_template_error(exc) from None
    fields = {name: getattr(chat, name) for name in _RequestFields.model_fields}
    fields.update(stop=[*template.stops, *_own_stops(chat)] or None,
                  max_tokens=chat.max_completion_tokens if chat.max_completion_tokens is not None else chat.max_tokens)
    return CompletionRequest.model_construct(
        **fields, prompt=[prompt],
        logprobs=(chat.top_logprobs or 0) if chat.logprobs else None, echo=False, best_of=None, suffix=None)


def chat_template_error(exc: ChatTemplateError) -> APIError:
    """A template that failed, passed a limit or timed out on these messages: 400 naming the template;
    every template worker busy: 503."""
    if isinstance(exc, ChatTemplateBusyError):
        return APIError(503, str(exc), type="server_error", code="chat_template_busy")
    return APIError(400, str(exc), param="messages", code="chat_template_error")
