"""Helpers of the HTTP tests: a served app on a tiny backbone, and the engine's own answer to compare with."""

from __future__ import annotations

import contextlib
import math
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import fastapi.routing
import httpx
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.routing import BaseRoute

from server.app import create_app
from server.backbone import Backbone
from server.delta import prepare_delta
from server.engine import Engine, Row
from server.http_server import DrainingServer, drain_app, uvicorn_options
from server.postprocess import predict_row
from server.service import Server
from server.settings import Settings

ADMIN = {"Authorization": "Bearer s3cret"}
# Path parameters filled so that a request which got past auth would find something (200, not 404).
PATH_PARAMS = {"name": "seq", "version": "1", "file": "dashboard.js"}


def endpoints(routes: list[BaseRoute]) -> Iterator[tuple[str, str]]:
    """(method, path template) of every route of an app, its included routers' too.

    FastAPI 0.165 keeps an included router as one lazy entry of `app.routes`, which
    `iter_route_contexts` (what its OpenAPI generator walks) flattens; earlier versions copy the routes in.
    """
    flatten = getattr(fastapi.routing, "iter_route_contexts", None)
    for route in flatten(routes) if flatten is not None else routes:
        for method in sorted(getattr(route, "methods", None) or ()):
            yield method, route.path


def call_route(client: TestClient, method: str, template: str, headers: dict[str, str] | None = None,
               **params: str) -> httpx.Response:
    """One request to a route template, with a body its method takes (a predict body; a non-delta upload)."""
    body: dict[str, Any] = ({"json": {"inputs": "hi"}} if method == "POST" else
                            {"content": b"x"} if method == "PUT" else {})
    return client.request(method, fill_path(template, **params), headers=headers or {}, **body)


def fill_path(template: str, **params: str) -> str:
    """`template` with its `{parameters}` filled from `params`, else `PATH_PARAMS`."""
    values = {**PATH_PARAMS, **params}
    return re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], template)


def settings(store: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"store": store, "demo": False, "batch_wait_ms": 5.0, "admin_token": "s3cret"}
    values.update(overrides)
    return Settings(**values)


@contextlib.contextmanager
def served(backbone: Backbone, store: Path, **overrides: Any) -> Iterator[TestClient]:
    with TestClient(create_app(settings(store, **overrides), backbone=backbone)) as client:
        yield client


@contextlib.asynccontextmanager
async def served_async(backbone: Backbone, store: Path, **overrides: Any) -> AsyncIterator[
        tuple[httpx.AsyncClient, FastAPI]]:
    """An app with its lifespan running, and an async client on it: real concurrency on one loop."""
    app = create_app(settings(store, **overrides), backbone=backbone)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://deltaserve") as client:
            yield client, app


def server_of(app: FastAPI) -> Server:
    return app.state.server


def engine_answer(backbone: Backbone, data: bytes, inputs: Sequence[str | tuple[str, str]],
                  max_length: int = 128) -> list[dict[str, Any]]:
    """What the engine itself answers for `inputs` (one forward of this task alone), post-processed."""
    delta = prepare_delta(data, backbone, "reference", 1)
    texts = backbone.encode(inputs, delta.meta.max_length or max_length)
    logits = Engine(backbone).forward([Row(delta, text) for text in texts])
    return [predict_row(out.numpy(), delta.meta, text, source)
            for out, text, source in zip(logits, texts, inputs, strict=True)]


def assert_close(actual: Any, expected: Any, tol: float = 2e-4, where: str = "") -> None:
    """Same structure, same strings, floats within `tol`."""
    if isinstance(expected, float):
        assert isinstance(actual, int | float) and math.isclose(actual, expected, abs_tol=tol), \
            f"{where}: {actual} != {expected}"
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), f"{where}: {actual} != {expected}"
        for key in expected:
            assert_close(actual[key], expected[key], tol, f"{where}.{key}")
    elif isinstance(expected, list | tuple):
        assert isinstance(actual, list) and len(actual) == len(expected), f"{where}: {actual} != {expected}"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_close(a, e, tol, f"{where}[{i}]")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def matches(actual: Any, expected: Any, tol: float = 2e-4) -> bool:
    try:
        assert_close(actual, expected, tol)
    except AssertionError:
        return False
    return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def live_server(app: FastAPI, host: str = "127.0.0.1") -> Iterator[str]:
    """A real uvicorn server on a free port, in a thread of this process; yields its base URL."""


    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)


HTTP_IMPLEMENTATIONS = ["h11", "httptools"]


@contextlib.contextmanager
def served_uvicorn(backbone: Backbone, store: Path, http: str,
                   **overrides: Any) -> Iterator[tuple[str, FastAPI, DrainingServer]]:
    """The app on real uvicorn in a thread of this process, configured as `deltaserve serve` configures it
    (`http`: "h11" or "httptools"); yields its base URL, the app and the uvicorn server (whose
    `handle_exit(signal.SIGTERM, None)` is what the signal handler runs)."""
    import pytest

    if http == "httptools":
        pytest.importorskip("httptools")
    options = settings(store, port=free_port(), http=http, **overrides)
    app = create_app(options, backbone=backbone)
    config = uvicorn.Config(app, **uvicorn_options(options), log_level="critical",
                            timeout_graceful_shutdown=options.shutdown_grace_s)
    server = DrainingServer(config, on_stop=lambda: drain_app(app))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{options.port}", app, server
    finally:
        server.should_exit = True
        thread.join(30)
