"""HTTP end to end: a real `python -m server serve` on 127.0.0.1, asyncio httpx clients, 16 tasks.

The server runs as a subprocess on a fresh store folder (no demo tasks), bound to loopback
only. The 16 deltas are uploaded with `PUT /tasks/{name}`; then, for each number of concurrent
clients, a bounded number of single-input `POST /tasks/{name}/predict` requests (tasks in turn)
are sent and timed. The engine offline — the same 16 deltas prepared in this process, the same
texts, batches of `offline_batch` rows — is measured right before each client level, so both
sides see the same neighbours.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from server.backbone import Backbone
from server.delta import prepare_delta
from server.engine import Engine, Row

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


@dataclass
class HttpLevel:
    clients: int
    requests: int
    errors: int
    seq_per_s: float
    p50_ms: float
    p99_ms: float
    offline_seq_per_s: float

    @property
    def ratio(self) -> float:
        return self.seq_per_s / self.offline_seq_per_s


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`python -m server serve` on loopback with its own store; stopped with SIGTERM."""

    def __init__(self, store: Path, threads: int, startup_s: float = 120.0,
                 extra: list[str] | None = None, root: Path = ROOT) -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        command = [sys.executable, "-m", "server", "serve", "--host", HOST, "--port", str(self.port),
                   "--store", str(store), "--no-demo", "--threads", str(threads), "--log-level", "warning",
                   *(extra or [])]
        self.process = subprocess.Popen(command, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        env={**os.environ, "PYTHONPATH": str(root)})
        deadline = time.monotonic() + startup_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.process.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError("server did not answer /health in time")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


async def _load(url: str, names: list[str], texts: list[str], clients: int, requests: int,
                timeout: float) -> tuple[float, list[float], int]:
    latencies: list[float] = []
    errors = 0
    counter = iter(range(requests))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:

        async def worker() -> None:
            nonlocal errors
            for i in counter:
                started = time.perf_counter()
                response = await client.post(f"/tasks/{names[i % len(names)]}/predict",
                                             json={"inputs": texts[i % len(texts)]})
                latencies.append(time.perf_counter() - started)
                errors += response.status_code != 200

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return time.perf_counter() - started, latencies, errors


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run(backbone: Backbone, engine: Engine, deltas: list[bytes], texts: list[str], levels: dict[int, int],
        threads: int, offline_batch: int = 64, timeout: float = 120.0) -> list[HttpLevel]:
    """`levels` maps number of clients -> number of requests at that level."""
    names = [f"task{i:02d}" for i in range(len(deltas))]
    prepared = [prepare_delta(d, backbone, n, 1) for n, d in zip(names, deltas, strict=True)]
    encoded = backbone.encode(texts)
    results = []
    with tempfile.TemporaryDirectory() as store:
        server = ServerProcess(Path(store), threads)
        try:
            for name, data in zip(names, deltas, strict=True):
                response = httpx.put(f"{server.url}/tasks/{name}", content=data, timeout=timeout,
                                     headers={"content-type": "application/octet-stream"})
                response.raise_for_status()
            asyncio.run(_load(server.url, names, texts, 4, 16, timeout))  # warm-up: loads every delta
            for clients, requests in levels.items():
                rows = [Row(prepared[i % len(prepared)], encoded[i % len(encoded)]) for i in range(requests)]
                started = time.perf_counter()
                for start in range(0, len(rows), offline_batch):
                    engine.forward(rows[start : start + offline_batch])
                offline = requests / (time.perf_counter() - started)
                wall, latencies, errors = asyncio.run(_load(server.url, names, texts, clients, requests, timeout))
                results.append(HttpLevel(clients, requests, errors, requests / wall,
                                         statistics.median(latencies) * 1e3, _percentile(latencies, 0.99) * 1e3,
                                         offline))
                print(f"http {clients:3d} clients: {requests / wall:7.1f} req/s (offline {offline:7.1f}), "
                      f"p50 {results[-1].p50_ms:.0f} ms, p99 {results[-1].p99_ms:.0f} ms, errors {errors}",
                      flush=True)
        finally:
            server.stop()
    return results
