"""uvicorn as deltaserve runs it: which HTTP/1.1 implementation, and request heads bounded in either.

The request head (request line and headers) must be bounded where it is read, before anything
parses it further: httptools has no limit of its own and gathers a header value by appending
each piece, so one 128 MB header cost 30 s of the event loop's CPU (quadratic) and stalled every
other request meanwhile; h11 stops at its buffer limit but answers a bare 400. Both protocol
classes here answer 431 once a head passes `max_header_bytes`, having read no more than that:

- httptools: the bytes fed to the parser while a head is incomplete are counted, and the parser
  is never fed past the limit;
- h11: its own limit (`h11_max_incomplete_event_size`) is set to the same bound, and the error it
  raises when a head passes it is answered 431 instead of 400.

The count of headers is bounded behind any server (server.api.middleware.HeaderLimitMiddleware):
within the byte bound it costs little, and it holds the same under Ray Serve's proxy.

`uvicorn_options` is the one place that turns the settings into uvicorn's arguments, and
`DrainingServer` the uvicorn server that tells the app the moment a stop signal comes: the CLI
serves with them (`serve`) and the tests start real servers with them.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import json
from collections.abc import Callable
from types import FrameType
from typing import Any, ClassVar

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.config import LOGGING_CONFIG
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.settings import Settings

HEAD_TOO_LARGE = 431


def head_refusal(limit: int) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Headers and JSON body of the 431 answered to a request head over `limit` bytes."""
    body = json.dumps({"detail": f"the request line and headers are over the limit of {limit} bytes"}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    return headers, body


class BoundedH11Protocol(H11Protocol):
    """h11, with a head over its buffer limit answered 431 (h11's own hint) rather than uvicorn's 400."""

    def send_400_response(self, msg: str) -> None:
        limit = self.config.h11_max_incomplete_event_size
        if limit is None or len(self.conn.trailing_data[0]) <= limit:
            super().send_400_response(msg)  # malformed, not too large
            return
        headers, body = head_refusal(limit)
        self.logger.warning("request head over %d bytes refused (431)", limit)
        response = h11.Response(status_code=HEAD_TOO_LARGE, headers=headers, reason=b"Request Header Fields Too Large")
        for event in (response, h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()


@functools.cache  # one class, defined only where httptools is installed
def _httptools_protocol() -> type[asyncio.Protocol] | None:
    if importlib.util.find_spec("httptools") is None:
        return None
    from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        """httptools, never fed more than `h11_max_incomplete_event_size` bytes of one request head."""

        default_limit: ClassVar[int] = 16 * 1024

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.max_head_bytes = self.config.h11_max_incomplete_event_size or self.default_limit
            self.head_bytes = 0  # bytes fed since the current head began (or the last one ended)
            self.reading_head = True

        def data_received(self, data: bytes) -> None:
            if self.reading_head:
                room = self.max_head_bytes - self.head_bytes
                if len(data) > room:
                    # Feed up to the limit: a small head followed by a large body in one read is fine.
                    super().data_received(data[:room])
                    if self.reading_head:
                        self.refuse_head()
                        return
                    data = data[room:]
                else:
                    self.head_bytes += len(data)
            super().data_received(data)

        def on_headers_complete(self) -> None:
            self.reading_head, self.head_bytes = False, 0
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self.reading_head = True  # what follows on this connection is the next request's head

        def refuse_head(self) -> None:
            if self.transport.is_closing():
                return
            headers, body = head_refusal(self.max_head_bytes)
            self.logger.warning("request head over %d bytes refused (431)", self.max_head_bytes)
            lines = [STATUS_LINE[HEAD_TOO_LARGE], *(name + b": " + value + b"\r\n" for name, value in headers)]
            self.transport.write(b"".join([*lines, b"\r\n", body]))
            self.transport.close()

    return BoundedHttpToolsProtocol


def http_protocol(implementation: str) -> type[asyncio.Protocol]:
    """The bounded protocol class for `auto` (httptools when installed, as uvicorn picks), `httptools` or `h11`."""
    if implementation == "h11":
        return BoundedH11Protocol
    httptools = _httptools_protocol()
    if httptools is not None:
        return httptools
    if implementation == "httptools":
        raise RuntimeError("--http httptools: httptools is not installed (pip install httptools)")
    return BoundedH11Protocol


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's arguments (`uvicorn.run`, `uvicorn.Config`) for these settings."""
    return {"host": settings.host, "port": settings.port, "http": http_protocol(settings.http),
            "h11_max_incomplete_event_size": settings.max_header_bytes}


class DrainingServer(uvicorn.Server):
    """uvicorn's server, calling `on_stop` (on the event loop) as soon as SIGTERM or Ctrl-C arrives.

    uvicorn notices the signal on its next tick, stops accepting connections, lets the running
    requests finish within `timeout_graceful_shutdown` and then cancels the rest. Requests on
    connections already open were still admitted meanwhile, so more work could be queued than
    the grace drains; `on_stop` is where the app stops admitting (503 + Retry-After) and reports
    not ready, at once.
    """

    def __init__(self, config: uvicorn.Config, on_stop: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_stop = on_stop
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.on_stop)  # a signal handler must not touch the loop's state


def drain_app(app: FastAPI) -> None:
    """Begin the app's graceful stop (see `server.service.Server.drain`), if its service is built yet."""
    server = getattr(app.state, "server", None)
    if server is not None:
        server.drain()


def serve(app: FastAPI, settings: Settings, log_config: dict[str, Any] | str | None = LOGGING_CONFIG) -> None:
    """Run `app` on uvicorn as `deltaserve serve` does, until a signal stops it gracefully."""
    config = uvicorn.Config(app, **uvicorn_options(settings), log_level=settings.log_level, log_config=log_config,
                            access_log=settings.access_log, timeout_graceful_shutdown=settings.shutdown_grace_s)
    DrainingServer(config, on_stop=lambda: drain_app(app)).run()
