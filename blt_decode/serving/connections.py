"""How long and how many connections the server holds: the bounds against half-open and slow clients.
See docs/serving.md ("Connections and time limits")."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import attrs

from blt_decode.checks import Validators, to_float
from blt_decode.errors import ConfigError

logger = logging.getLogger("blt_decode.serving")

#: the flag of ``blt-decode serve`` that sets each field (named in errors)
FLAGS = {"header_timeout_s": "--header-timeout", "body_timeout_s": "--body-timeout",
         "keep_alive_s": "--keep-alive-timeout", "max_connections": "--max-connections",
         "max_header_bytes": "max_header_bytes"}
_check = Validators(ConfigError, label=lambda a: FLAGS[a.name])
#: the longest time limit allowed (an hour: longer is "never" for a client, and holds a connection as long)
MAX_TIMEOUT_S = 3600.0


@attrs.frozen
class ConnectionLimits:
    """The server's bounds on connections (the defaults are ``blt-decode serve``'s)."""

    #: seconds from a connection's opening (or the end of its previous response) to a whole request head
    header_timeout_s: float = attrs.field(default=10.0, converter=to_float,
                                          validator=_check.number(0, MAX_TIMEOUT_S, low_open=True))
    #: seconds from a whole head to a whole body (the app's deadline while it reads the body)
    body_timeout_s: float = attrs.field(default=30.0, converter=to_float,
                                        validator=_check.number(0, MAX_TIMEOUT_S, low_open=True))
    #: seconds an idle kept-alive connection is held between requests
    keep_alive_s: float = attrs.field(default=5.0, converter=to_float,
                                      validator=_check.number(0, MAX_TIMEOUT_S, low_open=True))
    #: connections (idle ones included) and requests in progress at once; a request over it gets a 503
    max_connections: int = attrs.field(default=512, validator=_check.integer(1, 65536))
    #: most bytes of an unfinished request head (h11's limit; a longer head gets a 400)
    max_header_bytes: int = attrs.field(default=16 * 1024, validator=_check.integer(1024, 1 << 20))

    def uvicorn_settings(self) -> dict[str, Any]:
        """The keyword arguments of ``uvicorn.Config`` that apply these limits."""
        return {"http": _protocol(self.header_timeout_s, self.max_connections), "timeout_keep_alive": self.keep_alive_s,
                "h11_max_incomplete_event_size": self.max_header_bytes}


def _error_body(message: str, code: str, type: str = "invalid_request_error") -> bytes:
    return json.dumps({"error": {"message": message, "type": type, "param": None, "code": code}}).encode()


def _timeout_response(seconds: float) -> bytes:
    body = _error_body(f"no whole request head arrived within {seconds:g} s", "request_timeout")
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def _too_many(max_connections: int) -> Any:
    """The ASGI app a connection over the limit is answered by (503, then the connection is closed)."""
    body = _error_body(f"the server holds its most connections ({max_connections}); try again", "too_many_connections",
                       type="server_error")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    return app


def _protocol(header_timeout_s: float, max_connections: int) -> type:
    """uvicorn's h11 protocol with a deadline on request heads (h11 rather than httptools: h11 also bounds
    the size of an unfinished head)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadTimeoutH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None
        _head_bytes = False

        def _waiting_for_head(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            # armed once per head: bytes trickling in do not move the deadline (that is the slow-head attack)
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(header_timeout_s, self._head_timed_out)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.transport.is_closing() or not self._waiting_for_head():
                return
            if self._head_bytes:  # part of a head came: say why the connection ends (no request exists to answer)
                logger.warning("closed a connection from %s: no whole request head within %g s",
                               "%s:%d" % self.client if self.client else "?", header_timeout_s)
                self.transport.write(_timeout_response(header_timeout_s))
            self.transport.close()

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                # answered (not dropped: a client should see why) once its head arrives, within the head timeout
                logger.warning("a connection over the limit of %d gets a 503", max_connections)
                self.app = _too_many(max_connections)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._waiting_for_head():
                self._head_bytes = True
                self._arm()
            else:  # a whole head: the app times the body, the response is the app's
                self._head_bytes = False
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._head_bytes = False
            self._disarm()
            # for the next head (unless a pipelined one has just started); an idle connection is closed
            # sooner by the keep-alive timeout when it is the shorter
            if not self.transport.is_closing() and self._waiting_for_head():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeadTimeoutH11Protocol
