"""Issue 24 item 2: rows of requests whose client went away never reach the engine, and the queue is
counted in rows (real uvicorn, h11 and httptools; real client connections closed mid-wait).

Before, the handler of a predict was never cancelled: 200 requests of 64 texts given up after 0.3 s
were all computed (6,081 rows over 114 s) while a 1-text request sent meanwhile waited 113 s.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest
from delta_builders import build_delta
from http_helpers import ADMIN, HTTP_IMPLEMENTATIONS, served_async, served_uvicorn, server_of


def wait_until(condition, what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def send_predict(url: str, texts: list[str]) -> socket.socket:
    """A predict request sent on a raw connection that is left open (its answer never read)."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"inputs": texts}).encode()
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(b"POST /tasks/t/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    return sock


@pytest.mark.parametrize("http", HTTP_IMPLEMENTATIONS)
def test_rows_of_abandoned_requests_never_reach_the_engine(tiny_backbone, tmp_path, http):
    with served_uvicorn(tiny_backbone, tmp_path, http, max_batch_requests=4, batch_wait_ms=0) as (url, app, _):
        assert httpx.put(f"{url}/tasks/t", content=build_delta(tiny_backbone), headers=ADMIN).status_code == 201
        server = server_of(app)
        batcher, runner = server.batcher, server.runner
        forward = runner.forward
        ran: list[str] = []  # the text of every row the engine computed
        release = threading.Event()

        def recording(prepared):
            ran.extend(item.job.inputs[item.index] for item in prepared.items)
            release.wait(30)  # holds the engine: everything sent meanwhile waits in the queue
            return forward(prepared)

        runner.forward = recording
        first = send_predict(url, ["first"])
        wait_until(lambda: ran == ["first"], "the first request in the engine")
        abandoned = [send_predict(url, [f"gone {i} {j}" for j in range(8)]) for i in range(10)]
        # 80 rows admitted; the 4 first wait prepared for the engine
        wait_until(lambda: batcher._waiting_rows == 80 - 4, "the abandoned requests admitted")
        for sock in abandoned:
            sock.close()  # the clients go away
        wait_until(lambda: batcher.depth == 0 and batcher._waiting_rows == 0, "the abandoned rows dropped")

        answer: dict[str, httpx.Response] = {}
        live = threading.Thread(target=lambda: answer.update(
            r=httpx.post(f"{url}/tasks/t/predict", json={"inputs": ["alive"]}, timeout=60)))
        live.start()
        wait_until(lambda: batcher.depth == 1, "the live request queued")
        release.set()
        live.join(60)
        first.close()

        assert answer["r"].status_code == 200, answer["r"].text
        assert not [text for text in ran if text.startswith("gone")], ran
        assert "alive" in ran
        metrics = httpx.get(f"{url}/metrics", headers=ADMIN).text
        assert "deltaserve_abandoned_total 10.0" in metrics
        assert 'method="POST",route="/tasks/{name}/predict",status="499",task="t"} 10.0' in metrics


def test_the_queue_is_counted_in_rows_and_seconds_of_work(tiny_backbone, tmp_path):
    release = threading.Event()

    async def scenario():
        async with served_async(tiny_backbone, tmp_path, max_batch_requests=1, batch_wait_ms=0,
                                max_queue_rows=10, max_queue_s=3.0) as (client, app):
            await client.put("/tasks/t", content=build_delta(tiny_backbone), headers=ADMIN)
            batcher, runner = server_of(app).batcher, server_of(app).runner
            forward = runner.forward

            def held(prepared):
                release.wait(30)
                return forward(prepared)

            runner.forward = held

            def predict(texts):
                return asyncio.create_task(client.post("/tasks/t/predict", json={"inputs": texts}))

            async def settle(rows):
                while batcher._waiting_rows != rows:
                    await asyncio.sleep(0.005)

            # One row runs (held), one is prepared behind it; then the queue holds rows.
            accepted = [predict(["a"]), predict(["b"])]
            while batcher._in_flight < 2:
                await asyncio.sleep(0.005)
            accepted.append(predict([f"c{i}" for i in range(8)]))
            await settle(8)
            too_many = await client.post("/tasks/t/predict", json={"inputs": [f"d{i}" for i in range(3)]})
            accepted.append(predict(["e", "f"]))  # 8 + 2 = 10 rows: still room
            await settle(10)
            # Seconds of work: as if the engine had measured 1 row a second, 10 rows are 10 s > 3 s.
            batcher._rows_per_s = 1.0
            assert batcher.drain_seconds(10) == 10.0
            over_time = await client.post("/tasks/t/predict", json={"inputs": "g"})
            release.set()
            return too_many, over_time, await asyncio.gather(*accepted)

    too_many, over_time, accepted = asyncio.run(scenario())
    assert too_many.status_code == 429 and "retry-after" in too_many.headers
    assert over_time.status_code == 429 and int(over_time.headers["retry-after"]) >= 10
    assert [r.status_code for r in accepted] == [200] * 4


def test_a_request_larger_than_the_queue_is_admitted_when_nothing_waits(tiny_backbone, tmp_path):
    async def scenario():
        async with served_async(tiny_backbone, tmp_path, max_queue_rows=2) as (client, _):
            await client.put("/tasks/t", content=build_delta(tiny_backbone), headers=ADMIN)
            return await client.post("/tasks/t/predict", json={"inputs": ["a", "b", "c", "d", "e"]})

    assert asyncio.run(scenario()).status_code == 200
