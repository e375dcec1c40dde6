"""Soak: many mixed requests at many clients against a real server; errors by code, latency, RSS over time.

    python -m bench --soak                      # 10,000 requests at 64 clients
    python -m bench --soak --soak-requests 3000 # shorter

The server is `python -m server serve` on loopback (bench.http.ServerProcess) with 16 tasks of the
four methods. The mix, per 100 requests: 70 single-text predicts, 10 predicts of 4 texts, 5 of
a sentence pair, 5 reads (task info, /health, /metrics), 5 mistakes (an unknown task: 404, an
empty text: 422), and 5 rounds of sleep-free retries of whichever came up, while one task
is replaced every 125 requests (80 live replacements in 10,000). The server's RSS is read
from /proc at every tenth of the run: memory must level off after warm-up (within 5 %).
"""

from __future__ import annotations

import asyncio
import random
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.http import ServerProcess
from bench.workload import METHODS, make_method_delta, sentences
from server.backbone import Backbone


@dataclass
class SoakResult:
    requests: int
    clients: int
    seconds: float
    codes: dict[int, int]
    unexpected: dict[str, int]
    p50_ms: float
    p99_ms: float
    replacements: int
    rss_mb: list[tuple[int, float]] = field(default_factory=list)  # (requests done, RSS MB)

    @property
    def growth_after_warmup(self) -> float:
        """RSS growth from the first sample (after the warm-up tenth) to the last, as a fraction."""
        start, end = self.rss_mb[1][1], self.rss_mb[-1][1]
        return (end - start) / start


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run(requests: int = 10_000, clients: int = 64, threads: int = 1, seed: int = 0) -> SoakResult:
    backbone = Backbone.load(device="cpu")
    names = [f"task{i:02d}" for i in range(16)]
    deltas = {n: make_method_delta(backbone, METHODS[i % len(METHODS)], i).to_bytes() for i in range(16)
              for n in [names[i]]}
    texts = [" ".join(sentences(2, seed=i)) for i in range(64)]
    with tempfile.TemporaryDirectory() as store:
        server = ServerProcess(Path(store), threads)
        try:
            for name, data in deltas.items():
                httpx.put(f"{server.url}/tasks/{name}", content=data, timeout=120).raise_for_status()
            return asyncio.run(_soak(server, backbone, names, texts, requests, clients, seed))
        finally:
            server.stop()


async def _soak(server: ServerProcess, backbone: Backbone, names: list[str], texts: list[str], requests: int,
                clients: int, seed: int) -> SoakResult:
    rng = random.Random(seed)
    pid = server.process.pid
    codes: Counter[int] = Counter()
    unexpected: Counter[str] = Counter()
    latencies: list[float] = []
    rss: list[tuple[int, float]] = [(0, rss_mb(pid))]
    done = 0
    replacements = 0
    checkpoints = {round(requests * k / 10) for k in range(1, 11)}
    counter = iter(range(requests))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    # Replacement deltas made before the clock starts: building one costs the client's CPU.
    spare = [make_method_delta(backbone, METHODS[i % len(METHODS)], 100 + i).to_bytes() for i in range(8)]

    async with httpx.AsyncClient(base_url=server.url, timeout=300, limits=limits) as client:

        async def one(i: int) -> None:
            nonlocal replacements
            kind = rng.random()
            name = names[i % len(names)]
            text = texts[i % len(texts)]
            expected = 200
            started = time.perf_counter()
            if i % 125 == 124:
                response = await client.put(f"/tasks/{name}", content=spare[replacements % len(spare)])
                replacements += 1
            elif kind < 0.70:
                response = await client.post(f"/tasks/{name}/predict", json={"inputs": text})
            elif kind < 0.80:
                response = await client.post(f"/tasks/{name}/predict",
                                             json={"inputs": [texts[(i + j) % len(texts)] for j in range(4)]})
            elif kind < 0.85:
                response = await client.post(f"/tasks/{name}/predict", json={"inputs": [[text, texts[0]]]})
            elif kind < 0.90:
                path = rng.choice([f"/tasks/{name}", "/health", "/metrics", "/tasks"])
                response = await client.get(path)
            elif kind < 0.95:
                response = await client.post(f"/tasks/no-such-task-{i % 7}/predict", json={"inputs": text})
                expected = 404
            else:
                response = await client.post(f"/tasks/{name}/predict", json={"inputs": "   "})
                expected = 422
            elapsed = time.perf_counter() - started
            codes[response.status_code] += 1
            if response.status_code != expected and not (expected == 200 and response.status_code == 201):
                unexpected[f"{response.request.method} {response.status_code}"] += 1
            if response.request.method == "POST" and expected == 200:
                latencies.append(elapsed)

        async def worker() -> None:
            nonlocal done
            for i in counter:
                await one(i)
                done += 1
                if done in checkpoints:
                    rss.append((done, rss_mb(pid)))
                    print(f"soak {done:6d}/{requests}: RSS {rss[-1][1]:7.1f} MB", flush=True)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        seconds = time.perf_counter() - started
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * len(ordered)))]
    return SoakResult(requests, clients, seconds, dict(sorted(codes.items())), dict(unexpected),
                      statistics.median(ordered) * 1e3, p99 * 1e3, replacements, rss)


def section(result: SoakResult, when: str, commit: str, machine: str) -> str:
    samples = ", ".join(f"{n}: {mb:.0f}" for n, mb in result.rss_mb)
    codes = ", ".join(f"{code}: {count}" for code, count in result.codes.items())
    unexpected = ", ".join(f"{k}: {v}" for k, v in result.unexpected.items()) or "none"
    growth = result.growth_after_warmup
    return "\n".join([
        f"## Soak — {when} (commit {commit})",
        "",
        f"`python -m bench --soak --soak-requests {result.requests}` on {machine} (shared with other jobs).",
        f"{result.requests} mixed requests at {result.clients} clients in {result.seconds:.0f} s "
        f"({result.requests / result.seconds:.1f} req/s), {result.replacements} live replacements.",
        "",
        f"- answers by code: {codes}; unexpected: {unexpected}",
        f"- predict latency: p50 {result.p50_ms:.0f} ms, p99 {result.p99_ms:.0f} ms",
        f"- server RSS (MB) after n requests: {samples}",
        f"- RSS from the first tenth (after warm-up) to the end: {growth * 100:+.1f} % "
        f"({'flat' if abs(growth) <= 0.05 else 'NOT flat'} within 5 %)",
        "",
    ])
