"""The OpenAI-compatible HTTP app over one :class:`~blt_decode.engine.core.Engine` (FastAPI), and running it
with uvicorn. Routes, errors and design: docs/serving.md."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import secrets
import threading
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

import attrs
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

import blt_decode
from blt_decode.decoding import stops
from blt_decode.engine.core import Engine, EngineError
from blt_decode.engine.request import prepare
from blt_decode.errors import BLTDecodeError, ChatTemplateError
from blt_decode.model import tokenizer
from blt_decode.model.blt import BLTModel
from blt_decode.plugins import registry as plugins
from blt_decode.serving import tokens
from blt_decode.serving.bridge import ChoiceText, RequestStreams
from blt_decode.serving.chat import PLAIN, ChatTemplate, RenderLimits, TemplateRenderer
from blt_decode.serving.connections import ConnectionLimits
from blt_decode.serving.metrics import ServerMetrics
from blt_decode.serving.openai_schema import (
    APIError,
    CompletionRequest,
    StartedPrompt,
    api_error,
    chat_messages,
    chat_template_error,
    chat_to_completion,
    finish_reason,
    parse_chat_request,
    parse_request,
    to_requests,
)

#: request bodies larger than this are refused with 413 before they are read whole
DEFAULT_MAX_BODY_BYTES = 1 << 20

logger = logging.getLogger("blt_decode.serving")


def _finite(value: Any) -> Any:
    """JSON has no inf/nan (Starlette refuses them): statistics that are not finite become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _sse(data: Any) -> str:
    return f"data: {json.dumps(_finite(data), ensure_ascii=False, allow_nan=False)}\n\n"


@attrs.define
class ServerConfig:
    """What the app serves and how it guards itself."""

    model_name: str = "default"
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    backend: str = "eager"
    limits: ConnectionLimits = ConnectionLimits()


def create_app(engine: Engine, *, model_name: str = "default", api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, stop_engine: bool = True,
               chat_template: ChatTemplate = PLAIN, render_limits: RenderLimits = RenderLimits(),
               limits: ConnectionLimits = ConnectionLimits()) -> FastAPI:
    """The app over ``engine``. The engine's background thread is started when the app starts (ASGI
    lifespan) and, with ``stop_engine``, stopped when it shuts down. ``api_key``: every route but
    ``/health`` then needs ``Authorization: Bearer <api_key>``. ``chat_template`` renders the messages
    of ``/v1/chat/completions`` (:mod:`blt_decode.serving.chat`) in worker processes under
    ``render_limits``. ``limits``: the body deadline here; :func:`serve` and :class:`ServerThread` apply
    the rest (``app.state.config.limits``)."""
    config = ServerConfig(model_name=model_name, api_key=api_key, max_body_bytes=max_body_bytes,
                          backend=engine.backend.name, limits=limits)
    metrics = ServerMetrics(engine)
    created = int(time.time())
    renderer = TemplateRenderer(chat_template, render_limits)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            renderer.close()
            if stop_engine:
                await asyncio.to_thread(engine.stop)

    app = FastAPI(title="blt-decode", version=blt_decode.__version__, lifespan=lifespan,
                  description="OpenAI-compatible completions over a Byte Latent Transformer (docs/serving.md)")
    app.state.engine, app.state.metrics, app.state.config = engine, metrics, config
    if api_key is not None:
        app.add_middleware(BearerAuth, api_key=api_key, metrics=metrics)

    def error_response(error: APIError) -> JSONResponse:
        metrics.error(error.status, error.code)
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        if exc.status == 499:  # nobody reads this answer: one line in the log, not a server error
            logger.info("client disconnected during %s %s", request.method, request.url.path)
        response = error_response(exc)
        if exc.status == 408:  # the rest of the body may still come: end the connection rather than read it
            response.headers["connection"] = "close"
        return response

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        return error_response(APIError(exc.status_code, message, code=code))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(APIError(422, str(exc.errors()[0].get("msg", exc)), code="invalid_type"))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error"))

    def model_card() -> dict[str, Any]:
        return {"id": config.model_name, "object": "model", "created": created, "owned_by": "blt-decode",
                "blt_decode": {"backend": config.backend, "max_batch": engine.max_batch,
                               "max_seqlen": engine.model.config.max_seqlen,
                               "strategies": {name: _strategy_card(name) for name in plugins.strategy_names()}}}

    @app.get("/health")
    def health() -> JSONResponse:
        """200 while the engine's thread runs (no API key needed: for load balancers), with the engine's
        load; the process id tells replicas apart behind a proxy (Ray Serve)."""
        alive = engine.running
        return JSONResponse({"status": "ok" if alive else "engine stopped", "model": config.model_name,
                             "pid": os.getpid(), "live_requests": engine.live_requests,
                             "queue_depth": engine.queue_depth}, status_code=200 if alive else 503)

    @app.get("/v1/models")
    def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    def get_model(model_id: str) -> dict[str, Any]:
        if model_id != config.model_name:
            raise _unknown_model(model_id, config.model_name)
        return model_card()

    @app.get("/metrics")
    def prometheus() -> Response:
        # a plain `def`: FastAPI runs it in a worker thread, so reading the engine never blocks the loop
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/tokenizer_info")
    def tokenizer_info() -> dict[str, Any]:
        """The byte tokenizer, in the shape lm-eval's remote tokenizer (and vLLM's clients) read."""
        return {"tokenizer_class": "bytes", "eos_token": tokens.SPECIAL[tokens.EOS], "bos_token": tokens.SPECIAL[tokens.BOS],
                "pad_token": None, "vocab_size": tokens.EOS + 1, "model_max_length": engine.model.config.max_seqlen - 1,
                "chat_template": chat_template.source}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        data = _json_object(await _read_body(request, config))
        prompt, special = data.get("prompt"), data.get("add_special_tokens", False)
        if not isinstance(prompt, str) or not isinstance(special, bool):
            raise APIError(400, "the body must hold 'prompt' (a string) and optionally 'add_special_tokens' (a boolean)",
                           param="prompt", code="invalid_value")
        ids = tokens.tokenize(prompt, special)
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.model.config.max_seqlen - 1}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        ids = _json_object(await _read_body(request, config)).get("tokens")
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= tokens.EOS
                                                for t in ids):
            raise APIError(400, f"the body must hold 'tokens': a list of token ids 0..{tokens.EOS}", param="tokens",
                           code="invalid_value")
        return {"prompt": tokens.detokenize(ids)}

    async def run_completion(request: Request, body: CompletionRequest, kind: type["_Completion"]) -> Response:
        if body.model != config.model_name:
            raise _unknown_model(body.model, config.model_name)
        try:
            # in a worker thread: up to MAX_PROMPTS prompts to check and stop lists to compile must not hold
            # up the event loop (/health and every other stream) however big the request is
            requests, prepared = await asyncio.to_thread(_validate, body, engine)
        except BLTDecodeError as exc:
            raise api_error(exc, body) from None
        streams = RequestStreams(engine, requests)
        strategy = prepared[0].strategy.name
        for p in prepared:
            metrics.submitted(strategy, len(p.prompt))
        completion = kind(body, streams, prepared, config, metrics)
        if body.stream:
            return StreamingResponse(completion.sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return JSONResponse(_finite(await completion.whole(request)))

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Response:
        return await run_completion(request, parse_request(await _read_body(request, config)), _Completion)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        chat = parse_chat_request(await _read_body(request, config))
        if chat.model != config.model_name:
            raise _unknown_model(chat.model, config.model_name)
        try:  # a template is a program: in a worker process, under a time and a size limit, off the event loop
            prompt = await renderer.render_async(chat_messages(chat, chat_template))
        except ChatTemplateError as exc:
            raise chat_template_error(exc) from None
        try:
            return await run_completion(request, chat_to_completion(chat, chat_template, prompt), _ChatCompletion)
        except APIError as exc:  # the client sent max_completion_tokens: name that, not the field it maps to
            if exc.param == "max_tokens" and chat.max_completion_tokens is not None:
                raise attrs.evolve(exc, param="max_completion_tokens",
                                   message=exc.message.replace("max_tokens", "max_completion_tokens")) from None
            raise

    return app


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object", code="invalid_json")
    return data


def _validate(body: CompletionRequest, engine: Engine) -> tuple[list[Any], list[Any]]:
    """The body's requests and their validation (all before any is queued), with their stop lists'
    matchers built (:func:`blt_decode.decoding.stops.automaton` keeps them for the request's streams)."""
    requests = to_requests(body)
    prepared = [prepare(r, engine.model.config.max_seqlen) for r in requests]
    for p in prepared:
        engine.check_admissible(p)
        stops.automaton(p.stops)
    return requests, prepared


class BearerAuth:
    """ASGI middleware: every HTTP request but ``GET /health`` needs ``Authorization: Bearer <api_key>``,
    else 401 (before routing, so unknown routes and the OpenAPI pages are guarded too). Pure ASGI rather
    than Starlette's BaseHTTPMiddleware, which would sit between streaming responses and disconnects."""

    def __init__(self, app: Any, api_key: str, metrics: ServerMetrics | None = None):
        self.app, self.key, self.metrics = app, api_key.encode(), metrics

    def _allowed(self, scope: dict[str, Any]) -> bool:
        if scope["path"] == "/health":
            return True
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and secrets.compare_digest(token.strip(), self.key)
        return False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        error = APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        if self.metrics is not None:
            self.metrics.error(error.status, error.code)
        await JSONResponse(error.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)


def _strategy_card(name: str) -> dict[str, Any]:
    strategy = plugins.get_strategy(name)
    return {"description": strategy.description, "aliases": list(strategy.aliases),
            "options": {f.name: _json_default(f.default) for f in attrs.fields(strategy.Options)}}


def _json_default(default: Any) -> Any:
    """An option's default as JSON: a factory's value when it takes no arguments; null for none; else
    its text (a plugin's option may default to anything)."""
    if default is attrs.NOTHING:
        return None
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
        if default.takes_self:
            return None
        default = default.factory()
    if default is None or isinstance(default, (bool, int, float, str)):
        return default
    if isinstance(default, (list, tuple)) and all(isinstance(v, (bool, int, float, str)) for v in default):
        return list(default)
    return repr(default)


def _unknown_model(asked: str, served: str) -> APIError:
    return APIError(404, f"the model {asked!r} does not exist here; this server serves {served!r}",
                    param="model", code="model_not_found")


async def _read_body(request: Request, config: ServerConfig) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed ``max_body_bytes``, with 408 if it has
    not all arrived within ``limits.body_timeout_s``; a client that leaves before sending it all is a 499."""
    limit, seconds = config.max_body_bytes, config.limits.body_timeout_s
    too_big = APIError(413, f"request body over {limit} bytes", code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_big

    async def read() -> bytes:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_big
        return bytes(body)

    try:
        return await asyncio.wait_for(read(), seconds)
    except (asyncio.TimeoutError, TimeoutError):
        raise APIError(408, f"the request body did not arrive within {seconds:g} s", code="request_timeout") from None
    except ClientDisconnect:
        raise APIError(499, "the client disconnected before sending the whole body",
                       code="client_disconnected") from None


class _Completion:
    """One ``/v1/completions`` request in flight: its streams, texts and responses."""

    id_prefix, whole_object, chunk_object = "cmpl", "text_completion", "text_completion"

    def __init__(self, body: CompletionRequest, streams: RequestStreams, prepared: list[Any],
                 config: ServerConfig, metrics: ServerMetrics):
        self.body, self.streams, self.prepared, self.config, self.metrics = body, streams, prepared, config, metrics
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.strategy = prepared[0].strategy.name
        self.texts = [ChoiceText(p.stops, body.include_stop_str_in_output) for p in prepared]
        self.ended = [False] * len(prepared)

    def _head(self, chunk: bool = False) -> dict[str, Any]:
        return {"id": self.id, "object": self.chunk_object if chunk else self.whole_object, "created": self.created,
                "model": self.config.model_name}

    # -- the response's shape (chat overrides these) ----------------------------------------------------
    def _choice(self, index: int, text: str, finish: str, logprobs: dict[str, Any] | None) -> dict[str, Any]:
        return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish}

    def _piece(self, index: int, text: str, finish: str | None) -> dict[str, Any]:
        return {"text": text, "index": index, "logprobs": None, "finish_reason": finish}

    def _opening(self) -> list[dict[str, Any]]:
        """Choices of a first streamed chunk, before any text (none for completions)."""
        return []

    def _scored(self, index: int) -> tuple[bytes, Any] | None:
        """The bytes whose logprobs the choice reports and their :class:`~blt_decode.api.Score` (the
        model's next-byte distribution over prompt + returned text), or None when none are asked for."""
        if self.body.logprobs is None and not self.body.echo:
            return None
        from blt_decode.api import score

        prompt, returned = self.prepared[index].prompt, self.texts[index].returned
        if not prompt + returned:
            return b"", None
        s = score(self.streams.engine.model, prompt + returned, top_logprobs=self.body.logprobs or 0)
        start = 0 if self.body.echo else len(prompt)
        return (prompt + returned)[start:], attrs.evolve(
            s, logprobs=s.logprobs[start:], greedy=s.greedy[start:],
            top_ids=None if s.top_ids is None else s.top_ids[start:],
            top_logprobs=None if s.top_logprobs is None else s.top_logprobs[start:])

    def _logprobs(self, index: int, data: bytes, scored: Any) -> dict[str, Any] | None:
        if self.body.logprobs is None:
            return None
        started = self.body.echo and isinstance(self.streams.requests[index].prompt, StartedPrompt)
        if scored is None:
            return tokens.completion_logprobs(b"", [], None, None, bos=started)
        top = self.body.logprobs > 0
        return tokens.completion_logprobs(data, scored.logprobs, scored.top_ids if top else None,
                                          scored.top_logprobs if top else None, bos=started)

    def _echoed(self, index: int, text: str) -> str:
        return tokenizer.display(self.prepared[index].prompt) + text if self.body.echo else text

    def _extra(self, indexes: list[int]) -> dict[str, Any]:
        """The ``blt_decode`` field: strategy, options, and per choice the raw output and DecodeStats."""
        p = self.prepared[0]
        choices = []
        for i in indexes:
            stream = self.streams.streams[i]
            choices.append({"index": i, "output_bytes_hex": (stream.output or b"").hex(),
                            "stats": stream.stats.to_dict() if stream.stats is not None else None})
        return {"strategy": self.strategy, "options": attrs.asdict(p.options), "backend": self.config.backend,
                "choices": choices}

    def _usage(self) -> dict[str, int]:
        # bytes are the tokens: prompt bytes as sent (BOS not counted), every generated byte (a stop
        # sequence left out of the text included, EOS not)
        prompt = sum(len(p.prompt) for p in self.prepared)
        completion = sum(len(s.output or b"") for s in self.streams.streams)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _ended(self, index: int) -> APIError | None:
        """Book-keeping when a choice's request ends; its error (as an APIError) if it failed."""
        self.ended[index] = True
        stream = self.streams.streams[index]
        if stream.error is not None:
            self.metrics.finished(self.strategy, "failed", stream.stats)
            if isinstance(stream.error, EngineError):  # not admitted (out of memory) or the engine stopped
                return APIError(503, f"the engine could not run this request: {stream.error}", type="server_error",
                                code="engine_unavailable")
            return APIError(500, f"decoding failed: {type(stream.error).__name__}: {stream.error}",
                            type="server_error", code="decoding_failed")
        self.metrics.finished(self.strategy, "finished", stream.stats)
        return None

    async def _submit(self) -> None:
        try:
            await self.streams.submit()
        except EngineError as exc:  # an engine whose thread failed takes no more requests
            raise APIError(503, str(exc), type="server_error", code="engine_unavailable") from None

    def _abandoned(self) -> None:
        """The client left (or the response failed): cancel what runs, count it as cancelled."""
        self.streams.cancel_unfinished()
        for i, ended in enumerate(self.ended):
            if not ended:
                self.ended[i] = True
                self.metrics.finished(self.strategy, "cancelled", None)

    async def whole(self, request: Request) -> dict[str, Any]:
        """Wait for every choice; a client that disconnects meanwhile has its requests cancelled."""
        collect = asyncio.ensure_future(self._collect())
        watcher = asyncio.ensure_future(_wait_for_disconnect(request))
        try:
            await asyncio.wait({collect, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not collect.done():
                collect.cancel()
                self._abandoned()
                # cancel() only asks: wait until the task has taken it, so it counts as cancelled below
                await asyncio.gather(collect, return_exceptions=True)
        if collect.cancelled():  # the client is gone; nobody reads this
            raise APIError(499, "client disconnected", code="client_disconnected")
        texts = collect.result()  # a failed choice raises its APIError here
        choices = []
        for i, text in enumerate(texts):
            # one reference forward per choice, in a worker thread (the event loop serves everyone else)
            scored = await asyncio.to_thread(self._scored, i)
            logprobs = None if scored is None else self._logprobs(i, *scored)
            choices.append(self._choice(i, self._echoed(i, text), finish_reason(self.streams.streams[i].stats.stop_reason),
                                        logprobs))
        return {**self._head(), "choices": choices, "usage": self._usage(),
                "blt_decode": self._extra(list(range(len(texts))))}

    async def _collect(self) -> list[str]:
        texts = [""] * len(self.prepared)
        try:
            await self._submit()
            async for index, chunk in self.streams.events():
                if chunk is not None:
                    self.metrics.generated(self.strategy, len(chunk))
                    texts[index] += self.texts[index].feed(chunk)
                    continue
                error = self._ended(index)
                if error is not None:
                    raise error
                texts[index] += self.texts[index].finish(self.streams.streams[index].stats.stop_reason)
        finally:
            self._abandoned()  # a failed choice ends the response: the others are not waited for
        return texts

    async def sse(self) -> AsyncIterator[str]:
        """Server-sent events: a chunk per piece of text, a last chunk per choice with its finish_reason and
        ``blt_decode`` statistics, usage if asked (``stream_options.include_usage``), then ``[DONE]``."""
        try:
            await self._submit()
            opening = self._opening()
            if opening:
                yield _sse({**self._head(chunk=True), "choices": opening})
            async for index, chunk in self.streams.events():
                if chunk is not None:
                    self.metrics.generated(self.strategy, len(chunk))
                    text = self.texts[index].feed(chunk)
                    if text:
                        yield _sse({**self._head(chunk=True), "choices": [self._piece(index, text, None)]})
                    continue
                error = self._ended(index)
                if error is not None:
                    self.metrics.error(error.status, error.code)
                    yield _sse(error.body())
                    continue
                stream = self.streams.streams[index]
                text = self.texts[index].finish(stream.stats.stop_reason)
                yield _sse({**self._head(chunk=True), "choices": [self._piece(index, text, finish_reason(stream.stats.stop_reason))],
                            "blt_decode": self._extra([index])})
            if self.body.stream_options is not None and self.body.stream_options.include_usage:
                yield _sse({**self._head(chunk=True), "choices": [], "usage": self._usage()})
            yield "data: [DONE]\n\n"
        except APIError as error:
            self.metrics.error(error.status, error.code)
            yield _sse(error.body())
            yield "data: [DONE]\n\n"
        except Exception as exc:  # the headers are sent: the failure can only be an event (not a disconnect:
            # that cancels this generator with CancelledError/GeneratorExit, which are not Exceptions)
            error = APIError(500, f"{type(exc).__name__}: {exc}", type="server_error", code="server_error")
            self.metrics.error(error.status, error.code)
            yield _sse(error.body())
            yield "data: [DONE]\n\n"
        finally:
            # the client disconnected (the task is cancelled or the generator closed): free the slots
            self._abandoned()


class _ChatCompletion(_Completion):
    """One ``/v1/chat/completions`` request: the same decoding, OpenAI's chat shapes."""

    id_prefix, whole_object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def _choice(self, index: int, text: str, finish: str, logprobs: dict[str, Any] | None) -> dict[str, Any]:
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                "finish_reason": finish}

    def _piece(self, index: int, text: str, finish: str | None) -> dict[str, Any]:
        return {"index": index, "delta": {"content": text} if text else {}, "logprobs": None, "finish_reason": finish}

    def _opening(self) -> list[dict[str, Any]]:
        return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in range(len(self.prepared))]

    def _logprobs(self, index: int, data: bytes, scored: Any) -> dict[str, Any] | None:
        if self.body.logprobs is None:
            return None
        if scored is None:
            return tokens.chat_logprobs(b"", [], None, None)
        top = self.body.logprobs > 0
        return tokens.chat_logprobs(data, scored.logprobs, scored.top_ids if top else None,
                                    scored.top_logprobs if top else None)


async def _wait_for_disconnect(request: Request) -> bool:
    """True once the client has disconnected (the body has been read: only http.disconnect can come)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return True


def build_app(model: str | Path | BLTModel = "default", *, backend: str = "eager", max_batch: int = 16,
              model_name: str | None = None, api_key: str | None = None,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, dtype: Any = None, device: Any = None,
              chat_template: ChatTemplate = PLAIN, render_limits: RenderLimits = RenderLimits(),
              limits: ConnectionLimits = ConnectionLimits()) -> FastAPI:
    """Load ``model`` (a spec as :func:`blt_decode.load_model` takes, or a model), make its engine and the
    app over it. ``model_name`` (the ``model`` clients send) defaults to the spec as given."""
    loaded = blt_decode.load_model(model, dtype=dtype, device=device)
    engine = Engine(loaded, backend=backend, max_batch=max_batch)
    name = model_name or (str(model) if not isinstance(model, BLTModel) else "blt")
    return create_app(engine, model_name=name, api_key=api_key, max_body_bytes=max_body_bytes,
                      chat_template=chat_template, render_limits=render_limits, limits=limits)


def _limits(app: Any) -> ConnectionLimits:
    config = getattr(getattr(app, "state", None), "config", None)
    return getattr(config, "limits", None) or ConnectionLimits()


def serve(app: FastAPI, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run ``app`` with uvicorn until interrupted, under the app's connection limits."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
                **_limits(app).uvicorn_settings())


class ServerThread:
    """``with ServerThread(app) as server:`` runs ``app`` with uvicorn in a background thread on a free
    loopback port (``server.url``, e.g. ``http://127.0.0.1:43121``) and shuts it down (lifespan included)
    on exit. For tests and the load test: the same server as ``blt-decode serve``, in process."""

    def __init__(self, app: Any, *, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 start_timeout_s: float = 60.0):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                                                    timeout_graceful_shutdown=5, **_limits(app).uvicorn_settings()))
        self.host, self.start_timeout_s = host, start_timeout_s
        self.thread = threading.Thread(target=self.server.run, name="blt-decode-uvicorn", daemon=True)
        self.port: int | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server did not start (see its log)")
            if time.monotonic() > deadline:
                self.server.should_exit = True
                raise TimeoutError(f"the server did not start within {self.start_timeout_s} s")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
