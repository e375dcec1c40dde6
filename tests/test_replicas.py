"""Two `deltaserve serve` processes on one S3 store (a real SeaweedFS): what one is told, the other serves.

An upload answered by replica A is served by replica B within the poll bound, with B's answers
those of the new version's bytes; a replace and a delete likewise, in both directions.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
from delta_builders import build_delta
from http_helpers import ADMIN, assert_close, engine_answer, free_port
from test_http_lifecycle import save_backbone

REPO = Path(__file__).resolve().parents[1]
POLL_S = 0.5
BOUND_S = 2.0  # the default promise: a replica serves another's change within 2 s of its answer


@contextlib.contextmanager
def serve_process(backbone_dir: Path, store: str, port: int, log: Path) -> Iterator[str]:
    env = {**os.environ, "DELTASERVE_ADMIN_TOKEN": "s3cret", "PYTHONPATH": str(REPO)}
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "server", "serve", "--backbone", str(backbone_dir), "--port", str(port),
             "--store", store, "--store-poll-s", str(POLL_S), "--no-demo", "--threads", "1",
             "--log-level", "warning"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        yield url
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_healthy(url: str, log: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        time.sleep(0.2)
    raise AssertionError(f"{url} did not start: {log.read_text()[-3000:]}")


def wait_for(url: str, name: str, version: int | None) -> float:
    """Seconds until `url` reports task `name` at `version` (None: gone)."""
    started = time.monotonic()
    while time.monotonic() - started < 30:
        response = httpx.get(f"{url}/tasks/{name}", timeout=5)
        seen = response.json()["version"] if response.status_code == 200 else None
        if seen == version:
            return time.monotonic() - started
        time.sleep(0.02)
    raise AssertionError(f"{url} never showed {name} at version {version}")


def test_two_servers_on_one_s3_store_agree(s3_endpoint, tokenizer, tmp_path):
    backbone = save_backbone(tokenizer, tmp_path / "backbone")
    store = f"s3://deltaserve-tests/replicas-{uuid.uuid4().hex[:8]}"
    texts = ["a gripping, funny film", "dull and far too long"]
    v1 = build_delta(backbone, parts=("lora", "keep"), seed=1)
    v2 = build_delta(backbone, parts=("sparse", "pasta"), seed=2)
    logs = tmp_path / "a.log", tmp_path / "b.log"
    with serve_process(tmp_path / "backbone", store, free_port(), logs[0]) as a, \
            serve_process(tmp_path / "backbone", store, free_port(), logs[1]) as b:
        wait_healthy(a, logs[0])
        wait_healthy(b, logs[1])

        put = httpx.put(f"{a}/tasks/t", content=v1, headers=ADMIN, timeout=30)
        assert put.status_code == 201 and put.json()["version"] == 1
        assert wait_for(b, "t", 1) <= BOUND_S
        answer = httpx.post(f"{b}/tasks/t/predict", json={"inputs": texts}, timeout=30).json()
        assert answer["version"] == 1
        assert_close(answer["predictions"], engine_answer(backbone, v1, texts))

        put = httpx.put(f"{b}/tasks/t", content=v2, headers=ADMIN, timeout=30)  # the other way round
        assert put.status_code == 200 and put.json()["version"] == 2
        assert wait_for(a, "t", 2) <= BOUND_S
        answer = httpx.post(f"{a}/tasks/t/predict", json={"inputs": texts}, timeout=30).json()
        assert answer["version"] == 2
        assert_close(answer["predictions"], engine_answer(backbone, v2, texts))

        assert httpx.delete(f"{a}/tasks/t", headers=ADMIN, timeout=30).status_code == 204
        assert wait_for(b, "t", None) <= BOUND_S
        assert httpx.post(f"{b}/tasks/t/predict", json={"inputs": "x"}, timeout=30).status_code == 404
        assert httpx.get(f"{b}/tasks", timeout=5).json() == {"tasks": []}
