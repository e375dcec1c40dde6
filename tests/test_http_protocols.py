"""Issue 24 against real uvicorn, with each HTTP/1.1 implementation deltaserve ships (h11, httptools).

- A huge request head is refused with 431 having read no more than the limit (httptools had no
  limit: one 128 MB header froze the server for 30 s); too many headers are 431 too.
- HEAD keeps the keep-alive connection usable (under httptools every HEAD reset it).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from delta_builders import build_delta
from http_helpers import ADMIN, HTTP_IMPLEMENTATIONS, served_uvicorn
from uvicorn.server import ServerState

from server.http_server import BoundedH11Protocol, http_protocol

IMPLEMENTATIONS = HTTP_IMPLEMENTATIONS
LIMIT = 8 * 1024


@contextlib.contextmanager
def uvicorn_server(backbone, store, http: str, **overrides: Any) -> Iterator[str]:
    with served_uvicorn(backbone, store, http, max_header_bytes=LIMIT, **overrides) as (url, app, _):
        expected = BoundedH11Protocol if http == "h11" else http_protocol("httptools")
        assert app.state.settings.http == http and expected.__module__ == "server.http_server"
        yield url


def raw_request(url: str, head: bytes, piece: int | None = None) -> bytes:
    """Send `head` on a fresh connection (in pieces of `piece` bytes, as a slow client would) and read
    the whole answer (the server closes after a 431)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for at in range(0, len(head), piece or len(head)):
                sock.sendall(head[at:at + (piece or len(head))])
                if piece:
                    time.sleep(0.001)
        chunks = []
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("http", IMPLEMENTATIONS)
def test_request_heads_are_bounded_with_431(tiny_backbone, tmp_path, http):
    with uvicorn_server(tiny_backbone, tmp_path, http, max_headers=20) as url:
        # A 1 MB header arriving piece by piece: refused once the limit is passed.
        huge = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 1_000_000 + b"\r\n\r\n"
        answer = raw_request(url, huge, piece=16 * 1024)
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
        assert b"request line and headers are over the limit of 8192 bytes" in answer
        # One that arrives whole in one read (h11 then parses it complete): refused by the app.
        big = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (4 * LIMIT) + b"\r\n\r\n"
        answer = raw_request(url, big)
        assert answer.startswith(b"HTTP/1.1 431 ") and b"8192" in answer, answer[:200]
        # A head just under the limit is answered as usual.
        fits = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: " + b"a" * (LIMIT - 200) + b"\r\n\r\n"
        assert raw_request(url, fits).startswith(b"HTTP/1.1 200 ")
        # The limit holds across the pieces of one head, and per request on a kept-alive connection.
        with httpx.Client(base_url=url, timeout=30) as client:
            assert client.get("/health", headers={f"x-h{i}": "v" for i in range(15)}).status_code == 200
            many = client.get("/health", headers={f"x-h{i}": "v" for i in range(30)})
            assert many.status_code == 431 and "headers; the limit is 20" in many.json()["detail"]
            assert client.get("/health", headers={"x-big": "a" * (LIMIT - 500)}).status_code == 200
        assert httpx.get(f"{url}/health").status_code == 200


@pytest.mark.parametrize("http", IMPLEMENTATIONS)
def test_head_keeps_the_connection(tiny_backbone, tmp_path, http):
    with uvicorn_server(tiny_backbone, tmp_path, http) as url, \
            httpx.Client(base_url=url, limits=httpx.Limits(max_connections=1), timeout=30) as client:
        assert client.put("/tasks/t", content=build_delta(tiny_backbone), headers=ADMIN).status_code == 201
        port = None
        for _ in range(20):
            head = client.head("/tasks/t")
            get = client.get("/tasks/t")
            assert head.status_code == get.status_code == 200
            assert head.content == b"" and head.headers["content-length"] == get.headers["content-length"]
            ports = {r.extensions["network_stream"].get_extra_info("client_addr")[1] for r in (head, get)}
            assert len(ports) == 1 and (port is None or ports == {port}), "a HEAD closed the connection"
            port = ports.pop()
        # HEAD runs on a copy of the scope; the metrics still see which route answered it, and which method.
        metrics = client.get("/metrics", headers=ADMIN).text
        for method in ("GET", "HEAD"):
            series = f'{{method="{method}",route="/tasks/{{name}}",status="200",task="t"}}'
            assert f"deltaserve_requests_total{series} 20.0" in metrics


class FakeTransport:
    def __init__(self) -> None:
        self.written = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 5000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class CountingParser:
    def __init__(self, parser: Any) -> None:
        self.parser = parser
        self.fed = 0

    def feed_data(self, data: bytes) -> None:
        self.fed += len(data)
        self.parser.feed_data(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.parser, name)


def test_httptools_is_never_fed_past_the_limit():
    pytest.importorskip("httptools")

    async def app(scope, receive, send):  # pragma: no cover - never reached
        raise AssertionError("a head over the limit reached the app")

    async def feed() -> tuple[CountingParser, FakeTransport]:
        config = uvicorn.Config(app, http=http_protocol("httptools"), h11_max_incomplete_event_size=LIMIT)
        config.load()
        protocol = config.http_protocol_class(config=config, server_state=ServerState(), app_state={})
        transport = FakeTransport()
        protocol.connection_made(transport)
        protocol.parser = counting = CountingParser(protocol.parser)
        protocol.data_received(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ")
        chunk = b"a" * 65536
        for _ in range(16 * 1024):  # a 1 GiB header, offered 64 KiB at a time
            if transport.closed:
                break
            protocol.data_received(chunk)
        return counting, transport

    counting, transport = asyncio.run(feed())
    assert transport.closed and transport.written.startswith(b"HTTP/1.1 431 ")
    assert counting.fed <= LIMIT
