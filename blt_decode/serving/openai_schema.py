"""The OpenAI completions API as pydantic models, and how a request maps onto blt-decode requests.

:class:`CompletionRequest` parses the JSON body (types only: strict, unknown fields refused). Every value
check is left to the project's one validator, :func:`blt_decode.request.prepare`, which raises typed
:class:`~blt_decode.errors.BLTDecodeError` subclasses; :func:`api_error` turns those into OpenAI-style
errors (``{"error": {"message", "type", "param", "code"}}``) with an HTTP status.

Mapping (bytes are the tokens here):

- ``prompt``: a string (UTF-8), a list of strings (one choice each), a list of byte values 0..255 (raw
  bytes: the way to send a prompt that is not UTF-8) or a list of such lists;
- ``max_tokens`` = ``max_new_bytes`` (default 256, as :func:`blt_decode.generate`);
- ``temperature`` / ``top_p`` set the strategy's options of those names where it has them
  (autoregressive, BLT-S, BLT-DV); for a strategy without them (BLT-D) only the neutral values
  (temperature 0, top_p 1) are accepted, anything else is a 400 naming the field;
- ``seed`` = the request's seed; ``stop`` = stop sequences (left out of the returned text, as OpenAI
  does, unless ``include_stop_str_in_output``);
- extra body fields: ``strategy`` (a registered name or alias) and ``strategy_options`` (an object).
"""

from __future__ import annotations

from typing import Any

import attrs
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from blt_decode import plugins
from blt_decode.errors import (
    BLTDecodeError,
    InvalidOptionsError,
    InvalidRequestError,
    PromptTooLongError,
    UnknownStrategyError,
)
from blt_decode.request import DEFAULT_MAX_NEW_BYTES, Request

#: most prompts in one request (each is a request of its own in the engine)
MAX_PROMPTS = 256

#: OpenAI sampling fields that map onto strategy options of the same name -> the value that changes nothing
SAMPLING_FIELDS = {"temperature": 0.0, "top_p": 1.0}

#: OpenAI fields accepted only at their neutral value (what leaving them out means)
UNSUPPORTED_FIELDS = {
    "n": 1, "best_of": 1, "echo": False, "logprobs": None, "presence_penalty": 0.0, "frequency_penalty": 0.0,
    "logit_bias": {}, "suffix": None,
}


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
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False


class CompletionRequest(BaseModel):
    """The body of ``POST /v1/completions`` (OpenAI's fields, then blt-decode's extra ones)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    prompt: Any = Field(description="a string, a list of strings, a list of byte values 0..255, or a list of those")
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
    best_of: int | None = None
    echo: bool | None = None
    logprobs: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None
    # blt-decode's extra body fields
    strategy: str = Field("autoregressive", description="decoding strategy by name (see GET /v1/models)")
    strategy_options: dict[str, Any] = Field(default_factory=dict, description="the strategy's options")
    include_stop_str_in_output: bool = False

    @field_validator("prompt", mode="plain")
    @classmethod
    def _prompt(cls, value: Any) -> list[str | bytes]:
        """The prompts, each a str or raw bytes."""
        def raw(ids: list[Any]) -> bytes:
            if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i <= 255 for i in ids):
                raise ValueError("a prompt given as a list of integers holds byte values 0..255 (bytes are the tokens)")
            return bytes(ids)

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
    try:
        return CompletionRequest.model_validate_json(body)
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
