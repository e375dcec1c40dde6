"""Observability (issue 23 item 5): per-stage histograms of predict requests, a method label on HTTP metrics,
the process and GC collectors and build info in the server's own registry, request ids echoed, JSON logs."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
from delta_builders import build_delta
from http_helpers import free_port, served

from server.logs import JsonFormatter, request_id

REPO = Path(__file__).resolve().parents[1]
AUTH = {"Authorization": "Bearer s3cret"}


def sample(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def test_stage_histograms_method_label_process_and_build_info(tiny_backbone, tmp_path):
    with served(tiny_backbone, tmp_path / "store") as client:
        assert client.put("/tasks/t", content=build_delta(tiny_backbone), headers=AUTH).status_code == 201
        for _ in range(3):
            assert client.post("/tasks/t/predict", json={"inputs": ["one", "two words"]}).status_code == 200
        assert client.get("/tasks/t").status_code == 200
        text = client.get("/metrics").text
    for stage in ("tokenize", "queue", "inference", "postprocess"):
        assert sample(text, f"deltaserve_{stage}_seconds_count") == 3, stage
        assert sample(text, f"deltaserve_{stage}_seconds_sum") > 0, stage
    # PUT and GET of one route are two series now.
    assert 'deltaserve_requests_total{method="PUT",route="/tasks/{name}",status="201",task="t"} 1.0' in text
    assert 'deltaserve_requests_total{method="GET",route="/tasks/{name}",status="200",task="t"} 1.0' in text
    assert 'deltaserve_request_seconds_count{method="POST",route="/tasks/{name}/predict"} 3.0' in text
    assert sample(text, "process_resident_memory_bytes") > 10e6  # a Python with torch loaded
    assert "python_gc_collections_total" in text
    build = re.search(r"^deltaserve_build_info\{(.*)\} 1\.0$", text, re.M)
    assert build and 'backend="cpu"' in build.group(1) and 'device="cpu"' in build.group(1)
    assert 'dtype="float32"' in build.group(1) and "torch=" in build.group(1)


def test_request_id_is_echoed_or_made(tiny_backbone, tmp_path):
    with served(tiny_backbone, tmp_path / "store") as client:
        assert client.get("/health", headers={"X-Request-Id": "trace-42.a"}).headers["x-request-id"] == "trace-42.a"
        made = client.get("/tasks/none").headers["x-request-id"]  # a 404 carries one too
        assert re.fullmatch(r"[0-9a-f]{32}", made)
        assert client.get("/health").headers["x-request-id"] != made
        forged = client.get("/health", headers={"X-Request-Id": "x" * 200}).headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", forged)  # too long (or with odd characters): replaced


def test_json_formatter_carries_the_request_id():
    record = logging.LogRecord("deltaserve", logging.WARNING, __file__, 1, "queue at %d", (7,), None)
    token = request_id.set("abc")
    try:
        entry = json.loads(JsonFormatter().format(record))
    finally:
        request_id.reset(token)
    assert entry["message"] == "queue at 7" and entry["level"] == "warning" and entry["request_id"] == "abc"
    assert entry["logger"] == "deltaserve" and entry["time"].endswith("+00:00")


def test_serve_writes_json_logs_with_the_request_id(tiny_backbone, tokenizer, tmp_path):
    """`deltaserve serve --log-format json --access-log`: every line on stderr is a JSON object; the access
    line of a request carries the id the client sent."""
    folder = tmp_path / "backbone"
    tiny_backbone.model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "server", "serve", "--backbone", str(folder), "--port", str(port), "--no-demo",
         "--store", str(tmp_path / "store"), "--threads", "1", "--log-format", "json", "--access-log"],
        cwd=REPO, env={**os.environ, "DELTASERVE_MAX_BATCH_TOKEN": "5"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", headers={"X-Request-Id": "probe-1"},
                             timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=60)
    lines = [json.loads(line) for line in output.splitlines() if line.strip()]  # each one JSON, or this fails
    assert any("DELTASERVE_MAX_BATCH_TOKEN" in entry["message"] for entry in lines)
    access = [entry for entry in lines if entry["logger"] == "uvicorn.access" and entry.get("request_id") == "probe-1"]
    # The port answers while the backbone loads (503 `loading`), then 200: the last probe is the 200.
    assert access and access[-1]["path"] == "/health" and access[-1]["status"] == 200
    assert {entry["status"] for entry in access} <= {200, 503}
    assert process.returncode == 0
