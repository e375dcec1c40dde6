"""A 500 keeps the keep-alive connection open (real uvicorn, one real client connection).

Starlette's catch-all re-raises after sending its 500, and uvicorn then closed the connection,
so a client's next request on it failed with a reset (issue 8).
"""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from collections.abc import Iterator

import httpx
import uvicorn
from delta_builders import build_delta
from http_helpers import ADMIN, free_port, settings

from server.app import create_app


@contextlib.contextmanager
def uvicorn_server(backbone, store) -> Iterator[str]:
    port = free_port()
    config = uvicorn.Config(create_app(settings(store), backbone=backbone), host="127.0.0.1", port=port,
                            log_level="critical")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def local_port(response: httpx.Response) -> int:
    """The client side's port of the connection that carried `response`."""
    return response.extensions["network_stream"].get_extra_info("client_addr")[1]


def test_the_connection_survives_500s(tiny_backbone, tmp_path):
    with uvicorn_server(tiny_backbone, tmp_path) as url, \
            httpx.Client(base_url=url, limits=httpx.Limits(max_connections=1), timeout=60) as client:
        for name in ("corrupt", "unreadable", "fine"):
            assert client.put(f"/tasks/{name}", content=build_delta(tiny_backbone), headers=ADMIN).status_code == 201
        first = client.get("/health")
        port = local_port(first)

        # A file changed on disk: the store's own 500, naming it.
        (tmp_path / "deltas" / "corrupt" / "1.safetensors").write_bytes(b"changed under the store")
        # A file the disk cannot read at all: an error nothing expects (IsADirectoryError).
        path = tmp_path / "deltas" / "unreadable" / "1.safetensors"
        path.unlink()
        path.mkdir()
        try:
            for name, word in (("corrupt", "sha256"), ("unreadable", "internal error")):
                response = client.post(f"/tasks/{name}/predict", json={"inputs": "hello"})
                assert response.status_code == 500 and word in response.json()["detail"], response.text
                assert response.headers.get("connection", "").lower() != "close"
                after = client.post("/tasks/fine/predict", json={"inputs": "hello"})
                assert after.status_code == 200
                assert local_port(response) == local_port(after) == port, "the 500 closed the connection"
        finally:
            shutil.rmtree(path)
