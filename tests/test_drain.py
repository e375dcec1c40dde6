"""Issue 24 item 6: a graceful stop refuses new work at once and never answers 500.

SIGTERM with 100 requests in flight once gave 70 × 200 and 30 × 500 (`CancelledError`) when the
grace ran out. Now the signal stops admission at once (503 + Retry-After, readiness 503), the
queue holds no more work than half the grace drains, and what the grace cuts answers 503.
(tests/test_http_lifecycle.py sends a real SIGTERM to a `deltaserve serve` process.)
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import httpx
import pytest
from delta_builders import build_delta
from http_helpers import ADMIN, HTTP_IMPLEMENTATIONS, served_async, served_uvicorn, server_of

from server.service import queue_seconds
from server.settings import Settings


def wait_until(condition, what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_a_drain_refuses_new_work_at_once_and_finishes_what_was_admitted(tiny_backbone, tmp_path):
    release = threading.Event()

    async def scenario():
        async with served_async(tiny_backbone, tmp_path, batch_wait_ms=0) as (client, app):
            await client.put("/tasks/t", content=build_delta(tiny_backbone), headers=ADMIN)
            server = server_of(app)
            forward = server.runner.forward
            server.runner.forward = lambda prepared: (release.wait(30), forward(prepared))[1]
            admitted = asyncio.create_task(client.post("/tasks/t/predict", json={"inputs": "before"}))
            while server.batcher._in_flight < 1:
                await asyncio.sleep(0.005)
            server.drain()  # what the signal handler calls
            refused = await client.post("/tasks/t/predict", json={"inputs": "after"})
            health = await client.get("/health")
            ready = await client.get("/v2/health/ready")
            live = await client.get("/v2/health/live")
            release.set()
            return await admitted, refused, health, ready, live

    admitted, refused, health, ready, live = asyncio.run(scenario())
    assert admitted.status_code == 200
    assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
    assert "shutting down" in refused.json()["detail"]
    assert health.status_code == 503 and health.json()["status"] == "shutting down"
    assert ready.status_code == 503 and ready.json() == {"ready": False}
    assert live.status_code == 200  # alive, only not taking work


@pytest.mark.parametrize("http", HTTP_IMPLEMENTATIONS)
def test_work_cut_by_the_grace_answers_503_not_500(tiny_backbone, tmp_path, http):
    release = threading.Event()
    with served_uvicorn(tiny_backbone, tmp_path, http, shutdown_grace_s=1.0, max_batch_requests=1,
                        batch_wait_ms=0) as (url, app, uvicorn_server):
        assert httpx.put(f"{url}/tasks/t", content=build_delta(tiny_backbone), headers=ADMIN).status_code == 201
        server = server_of(app)
        forward = server.runner.forward
        server.runner.forward = lambda prepared: (release.wait(60), forward(prepared))[1]  # longer than the grace
        answers: list[httpx.Response] = []

        def ask(i: int) -> None:
            answers.append(httpx.post(f"{url}/tasks/t/predict", json={"inputs": f"text {i}"}, timeout=60))

        clients = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for thread in clients:
            thread.start()
        # One in the engine, one prepared behind it, two queued.
        wait_until(lambda: server.batcher._in_flight == 2 and server.batcher.depth == 2, "4 requests in flight")
        uvicorn_server.handle_exit(signal.SIGTERM, None)  # what uvicorn's signal handler runs
        wait_until(lambda: server.draining, "the drain to begin")
        for thread in clients:
            thread.join(60)
        release.set()  # let the held forward end, so that the shutdown can finish

    assert len(answers) == 4
    for response in answers:
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "5" and "shutting down" in response.json()["detail"]


def test_admission_holds_no_more_work_than_half_the_grace():
    assert queue_seconds(Settings(max_queue_s=20, shutdown_grace_s=30)) == 15
    assert queue_seconds(Settings(max_queue_s=5, shutdown_grace_s=30)) == 5
