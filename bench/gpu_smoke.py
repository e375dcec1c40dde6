"""HTTP smoke test: a real server on this machine, many concurrent mixed requests, each answer
checked against the independent reference.

    python -m bench.gpu_smoke                     # auto backend (triton on a GPU), 64 clients, 64 requests
    python -m bench.gpu_smoke --backend cpu --clients 8 --requests 16

`python -m server serve` runs as a subprocess on 127.0.0.1 with a fresh store; 16 tasks of every
method (pasta, lora, mask, dsee in turn; `bench.workload`) are uploaded, then `--requests`
single-input predictions, tasks and texts mixed (pairs included), are sent by `--clients`
threads at once, so the batcher mixes them. Every answer's probabilities are compared with the
reference's (`tests/reference.py`: each task's effective weights in a private fp32 model copy,
one text at a time, on the CPU): within `--tolerance` (default 5e-2, float16 serving).
Standard library HTTP only (the GPU image may lack httpx). Prints one summary block; exits 1 on
any error or mismatch.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
TOKEN = "smoke-admin-token"
RETRIES = 5  # per request, on 429/503 with Retry-After (admission control under load)


def _request(url: str, method: str = "GET", body: bytes | None = None, content_type: str = "application/json",
             timeout: float = 300.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method=method,
                                     headers={"Content-Type": content_type, "Authorization": f"Bearer {TOKEN}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _request_with_retry_after(url: str, body: bytes) -> tuple[int, bytes, float | None]:
    """POST JSON; (status, body, the Retry-After seconds when the server sent one)."""
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
    try:
        with urllib.request.urlopen(request, timeout=300.0) as response:
            return response.status, response.read(), None
    except urllib.error.HTTPError as error:
        retry_after = error.headers.get("Retry-After")
        return error.code, error.read(), float(retry_after) if retry_after else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def start_server(store: Path, backend: str, startup_s: float) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    url = f"http://{HOST}:{port}"
    command = [sys.executable, "-m", "server", "serve", "--host", HOST, "--port", str(port), "--store", str(store),
               "--no-demo", "--backend", backend, "--admin-token", TOKEN, "--log-level", "warning"]
    log = tempfile.NamedTemporaryFile(prefix="smoke-server-", suffix=".log", delete=False)  # noqa: SIM115
    process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                   [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])})
    deadline = time.monotonic() + startup_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited at start:\n{Path(log.name).read_text()[-3000:]}")
        try:
            if _request(f"{url}/health", timeout=2)[0] == 200:
                return process, url
        except OSError:
            pass
        time.sleep(0.5)
    stop(process)
    raise RuntimeError(f"server did not answer /health within {startup_s:.0f} s:\n{Path(log.name).read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run(backend: str, clients: int, requests: int, tasks: int, tolerance: float, startup_s: float) -> dict:
    from bench.workload import make_method_delta, sentences
    from server.backbone import Backbone
    from tests.reference import ReferenceTask

    reference_backbone = Backbone.load(None, device="cpu", dtype=torch.float32, backend="cpu")
    deltas = [make_method_delta(reference_backbone, "mix", seed) for seed in range(tasks)]
    references = [ReferenceTask(reference_backbone.model, delta) for delta in deltas]
    pool = sentences(requests, seed=7)
    inputs: list[str | list[str]] = [[pool[i], pool[(i + 1) % len(pool)]] if i % 5 == 4 else pool[i]
                                     for i in range(requests)]
    report: dict = {"backend_requested": backend, "clients": clients, "requests": requests, "tasks": tasks}
    with tempfile.TemporaryDirectory() as store:
        started = time.perf_counter()
        process, url = start_server(Path(store), backend, startup_s)
        report["startup_s"] = round(time.perf_counter() - started, 1)
        try:
            health = json.loads(_request(f"{url}/health")[1])
            report["backend"], report["backend_reason"] = health.get("backend"), health.get("backend_reason")
            for index, delta in enumerate(deltas):
                status, body = _request(f"{url}/tasks/task{index:02d}", "PUT", delta.to_bytes(),
                                        "application/octet-stream")
                if status not in (200, 201):
                    raise RuntimeError(f"upload of task{index:02d}: {status} {body[:300]!r}")

            retries = [0]

            def predict(i: int) -> tuple[int, float, dict]:
                began = time.perf_counter()
                payload = json.dumps({"inputs": inputs[i] if isinstance(inputs[i], str)
                                      else [inputs[i]]}).encode()  # a pair: a list of one pair
                for _ in range(RETRIES + 1):  # as a client should: 429/503 with Retry-After are waited out
                    status, body, retry_after = _request_with_retry_after(
                        f"{url}/tasks/task{i % tasks:02d}/predict", payload)
                    if status not in (429, 503) or retry_after is None:
                        break
                    retries[0] += 1
                    time.sleep(min(retry_after, 10.0))
                return status, time.perf_counter() - began, json.loads(body) if status == 200 else {"error": body}

            with ThreadPoolExecutor(clients) as executor:  # every task loaded once before timing
                list(executor.map(predict, range(min(requests, tasks))))
                began = time.perf_counter()
                answers = list(executor.map(predict, range(requests)))
                wall = time.perf_counter() - began
        finally:
            stop(process)
    errors = [a for a in answers if a[0] != 200]
    worst = 0.0
    for i, (status, _, body) in enumerate(answers):
        if status != 200:
            continue
        text = inputs[i]
        encoded = reference_backbone.encode([text if isinstance(text, str) else (text[0], text[1])])[0]
        want = torch.softmax(references[i % tasks].logits(encoded).float(), -1)
        scores = body["predictions"][0]["scores"]
        got = torch.tensor([scores[label] for label in deltas[i % tasks].meta.labels])
        worst = max(worst, (got - want).abs().max().item())
    latencies = sorted(a[1] for a in answers)
    report.update(errors=len(errors), retries_after_429_or_503=retries[0],
                  first_error=str(errors[0][2])[:300] if errors else None,
                  requests_per_s=round(requests / wall, 1), p50_ms=round(statistics.median(latencies) * 1e3, 1),
                  p99_ms=round(latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))] * 1e3, 1),
                  max_probability_difference=worst, tolerance=tolerance,
                  passed=not errors and worst <= tolerance)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_smoke", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="auto", choices=("auto", "cpu", "triton"))
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--tolerance", type=float, default=5e-2, help="on probabilities (float16 serving)")
    parser.add_argument("--startup-s", type=float, default=900.0, help="the Triton warm-up compiles at start")
    args = parser.parse_args(argv)
    report = run(args.backend, args.clients, args.requests, args.tasks, args.tolerance, args.startup_s)
    print("HTTP smoke test:", json.dumps(report, indent=1))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
