"""ASGI middleware: request ids (echoed, and in the logs), request metrics by route, the body-size limit checked
before anything parses a body,
the methods of a path (OPTIONS, HEAD, 405), and 500s answered without dropping the connection.

Plain ASGI rather than `BaseHTTPMiddleware`: none needs the request object, and plain ASGI
neither buffers streaming bodies nor adds a task per request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.requests import Request
from starlette.routing import Match, Router

from server.api.errors import error_response, handle
from server.logs import REQUEST_ID_HEADER, request_id, request_id_from
from server.service import Server

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PROBED_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


class StartWatch:
    """A `send` that notes whether the response has started: once its head is out, a middleware that
    catches the app's failure can no longer answer in its place (ShutdownMiddleware, InternalErrorMiddleware)."""

    def __init__(self, send: Send) -> None:
        self.send = send
        self.started = False

    async def __call__(self, message: MutableMapping[str, Any]) -> None:
        self.started = self.started or message["type"] == "http.response.start"
        await self.send(message)


class HttpMiddleware:
    """Plain ASGI middleware that acts on HTTP requests only (lifespan and websocket pass through)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.handle(scope, receive, send)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise NotImplementedError


class MetricsMiddleware(HttpMiddleware):
    """Counts every HTTP request by route template, method, task and status, and times it by route and method
    (PUT and GET of /tasks/{name} were one series)."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
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
                # The method only where a route matched: a client cannot grow the label set with made-up ones.
                method = scope["method"] if route is not None else ""
                server.metrics.requests.labels(path, method, task, str(status)).inc()
                server.metrics.latency.labels(path, method).observe(time.perf_counter() - started)


class BodyLimitMiddleware(HttpMiddleware):
    """413 for a request body over `limit`, before anything parses it; uploads (PUT) have their own limit.

    A long text is truncated only after tokenising all of it, so without this a single huge
    JSON body would cost the tokenizer thread its whole length.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        super().__init__(app)
        self.limit = limit

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] in ("PUT", "GET", "HEAD", "DELETE"):
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


class HeaderLimitMiddleware(HttpMiddleware):
    """431 for a request with more than `max_count` headers or more than `max_bytes` of them.

    The byte bound is enforced where the head is read (server/http_server.py), before anything
    is parsed further; this one holds behind any server (Ray Serve's proxy too) and adds the count.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, max_count: int) -> None:
        super().__init__(app)
        self.max_bytes = max_bytes
        self.max_count = max_count

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = scope["headers"]
        size = sum(len(name) + len(value) + 4 for name, value in headers)  # "name: value\r\n"
        problem = None
        if len(headers) > self.max_count:
            problem = f"the request has {len(headers)} headers; the limit is {self.max_count}"
        elif size > self.max_bytes:
            problem = f"the request headers are {size} bytes; the limit is {self.max_bytes}"
        if problem is None:
            await self.app(scope, receive, send)
            return
        response = error_response(431, problem, {"Connection": "close"}, path=scope["path"])
        await response(scope, receive, send)


class ShutdownMiddleware(HttpMiddleware):
    """A request cut by a graceful stop answers 503 with Retry-After, not 500.

    When the shutdown grace runs out, uvicorn cancels the requests still running; the cancel
    went up through the app and uvicorn answered it 500 (30 of 100 in flight at 60 s). While the
    server drains, that cancel is the stop's, and it is answered as every other refusal of a
    stopping server is (if no part of the answer has gone out yet).
    """

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        watched = StartWatch(send)
        try:
            await self.app(scope, receive, watched)
        except asyncio.CancelledError:
            server: Server | None = getattr(scope["app"].state, "server", None)
            if watched.started or server is None or not server.draining:
                raise
            response = error_response(503, "the server is shutting down; this request was cut at the end of "
                                           "its grace", {"Retry-After": "5"}, path=scope["path"])
            await response(scope, receive, send)


class DisconnectMiddleware(HttpMiddleware):
    """Cancels the handling of a POST whose client went away, once its body has been read.

    Neither uvicorn nor Starlette cancels a handler when its client disconnects, so the rows of
    abandoned predict requests were still computed (200 requests of 64 texts given up after
    0.3 s: 6,081 rows over 114 s while a 1-text request waited). Here, after the app has read the
    whole body, the next message of the connection is awaited beside the handler; when it is
    `http.disconnect` before the response has been sent, the handler is cancelled, which cancels
    the batcher's future and takes the request's rows out of the queue (server.batching).
    Whoever else asks the app's `receive` for that message gets it too. The metrics count such a
    request as 499 (client closed request), a status nothing is sent with.
    """

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        body_read = asyncio.Event()
        after_body: asyncio.Future[MutableMapping[str, Any]] = loop.create_future()
        responded = False
        left = False

        async def receive_body() -> MutableMapping[str, Any]:
            if body_read.is_set():
                return await asyncio.shield(after_body)
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_read.set()
                if message["type"] == "http.disconnect" and not after_body.done():
                    after_body.set_result(message)
            return message

        async def send_watched(message: MutableMapping[str, Any]) -> None:
            nonlocal responded
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                responded = True
            await send(message)

        handler = asyncio.ensure_future(self.app(scope, receive_body, send_watched))

        async def watch() -> None:
            nonlocal left
            await body_read.wait()
            message = after_body.result() if after_body.done() else await receive()
            while message["type"] == "http.request":  # an empty extra body message; not the end yet
                message = await receive()
            if not after_body.done():
                after_body.set_result(message)
            if message["type"] == "http.disconnect" and not responded and not handler.done():
                left = True
                handler.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            await handler
        except asyncio.CancelledError:
            if not left:
                raise  # the server's own cancel (shutdown), not the client's leaving
            await send({"type": "http.response.start", "status": 499, "headers": []})  # no one reads it
            await send({"type": "http.response.body", "body": b""})
        finally:
            watcher.cancel()


class InternalErrorMiddleware(HttpMiddleware):
    """Answers an unexpected exception with the 500 of `errors.handle`, and does not re-raise it.

    Starlette's own catch-all (ServerErrorMiddleware) sends the 500 and then re-raises, so that
    the server can log it; uvicorn then closes the connection, and a keep-alive client's next
    request on it fails. Installed innermost, this handles the error first: the connection stays
    open and the error is logged once, here.
    """

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        watched = StartWatch(send)
        try:
            await self.app(scope, receive, watched)
        except Exception as exc:
            if watched.started:  # half a response is out: only closing the connection can tell the client
                raise
            response = await handle(Request(scope), exc)
            await response(scope, receive, send)


class MethodsMiddleware(HttpMiddleware):
    """The methods of a path, answered as HTTP says: OPTIONS lists them, HEAD runs GET without the body,
    and a method the path lacks is 405 with every method it has.

    Starlette answers from the first route whose path matches, so `OPTIONS /tasks/x` said
    `Allow: GET` although PUT and DELETE exist, and FastAPI's GET routes answered HEAD with 405.
    """

    def __init__(self, app: ASGIApp, router: Router) -> None:
        super().__init__(app)
        # Given, not read from scope["app"]: under Ray Serve's ingress that is another application.
        self.router = router

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["method"]
        if method != "OPTIONS" and self.serves(scope, method):  # the common case: one pass over the routes
            await self.app(scope, receive, send)
            return
        methods = {m for m in PROBED_METHODS if self.serves(scope, m)}
        if not methods:  # no route has this path: the router's 404
            await self.app(scope, receive, send)
            return
        allow = ", ".join(sorted(methods | {"OPTIONS"} | ({"HEAD"} if "GET" in methods else set())))
        if method == "OPTIONS":
            await send({"type": "http.response.start", "status": 204, "headers": [(b"allow", allow.encode())]})
            await send({"type": "http.response.body", "body": b""})
            return
        if method == "HEAD" and "GET" in methods:
            # A copy: the server reads scope["method"] of its own scope to send a HEAD answer's
            # headers without a body; rewritten in place, httptools' uvicorn waited for the GET's
            # body and reset the connection. The router's match is copied back for the metrics.
            as_get = {**scope, "method": "GET"}

            async def without_body(message: MutableMapping[str, Any]) -> None:
                if message["type"] == "http.response.body":
                    message = {**message, "body": b""}
                await send(message)

            try:
                await self.app(as_get, receive, without_body)
            finally:
                scope.update({key: as_get[key] for key in ("route", "path_params", "endpoint") if key in as_get})
            return
        response = error_response(405, f"{method} is not allowed on {scope['path']}; allowed: {allow}",
                                  {"Allow": allow})
        await response(scope, receive, send)

    def serves(self, scope: Scope, method: str) -> bool:
        """Whether a route answers `method` on this path (routers included in the app too)."""
        probe = {**scope, "method": method}
        return any(route.matches(probe)[0] is Match.FULL for route in self.router.routes)


class RequestIdMiddleware(HttpMiddleware):
    """Gives every request an id (the client's `X-Request-Id` when usable, else a new one), sets it for the
    logs of the request's task (server/logs.py) and echoes it in the answer's `X-Request-Id`."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        rid = request_id_from(dict(scope["headers"]).get(REQUEST_ID_HEADER.encode()))
        token = request_id.set(rid)

        async def send_with_id(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != REQUEST_ID_HEADER.encode()]
                message = {**message, "headers": [*headers, (REQUEST_ID_HEADER.encode(), rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id.reset(token)
