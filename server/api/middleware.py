"""ASGI middleware: request metrics by route, and the body-size limit checked before anything parses a body.

Plain ASGI rather than `BaseHTTPMiddleware`: neither needs the request object, and plain ASGI
neither buffers streaming bodies nor adds a task per request.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from server.api.errors import error_response
from server.service import Server

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class MetricsMiddleware:
    """Counts every HTTP request by route template, task and status, and times it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            server: Server | None = getattr(scope["app"].state, "server", None)
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            name = scope.get("path_params", {}).get("name", "")
            # Only known task names become label values: a client cannot grow the label set.
            task = name if name and server is not None and server.store.get_info(name) is not None else ""
            if server is not None:
                server.metrics.requests.labels(path, task, str(status)).inc()
                server.metrics.latency.labels(path).observe(time.perf_counter() - started)


class BodyLimitMiddleware:
    """413 for a request body over `limit`, before anything parses it; uploads (PUT) have their own limit.

    A long text is truncated only after tokenising all of it, so without this a single huge
    JSON body would cost the tokenizer thread its whole length.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("PUT", "GET", "HEAD", "DELETE"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, receive, send)
            return
        if declared.isdigit():
            await self.app(scope, receive, send)
            return
        # A body without a length: read it here (up to the limit), then replay it to the app.
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.limit:
                await self._refuse(scope, receive, send)
                return
            if message["type"] != "http.request" or not message.get("more_body", False):
                break

        async def replay() -> MutableMapping[str, Any]:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(413, f"the request body is over the limit of {self.limit} bytes",
                                  path=scope["path"])
        await response(scope, receive, send)
