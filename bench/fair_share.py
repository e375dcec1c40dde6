"""Fair share between tenants: one tenant floods, another sends one text at a time, on a real server.

    python -m bench --fair-share            # this section only, appended to BENCHMARKS.md
    python -m bench --fair-share --no-write # print it

The same load runs twice against `python -m server serve` on loopback (MiniLM, a fresh store):

- **tenants**: a tenants file with `flood` and `light` (weight 1 each); `flood` owns two tasks, `light` one;
- **no tenants**: the same tasks and clients, no tenants file (first come, first served, as before).

`flood` runs 48 clients, each sending 8 texts per request, the next as soon as the last is answered;
`light` runs one client sending one text at a time. A 429 is counted and its client waits a tenth of a
second (the load stays on; a real client would wait Retry-After). After a warm-up, both run for
`seconds`: the figures are each tenant's median and p90 latency of the requests started in that
window (each timed to its answer) and the texts answered within it, per second. The issue's bar:
the light tenant's median ≤ ½ of the flooding tenant's, and the total ≥ 0.95× the same load
without tenants.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.http import ServerProcess
from bench.workload import make_method_delta, sentences
from server.backbone import Backbone

FLOOD_CLIENTS, FLOOD_TEXTS = 48, 8
KEYS = {"flood": "flood-key", "light": "light-key"}
ADMIN = "bench-admin"


@dataclass
class Load:
    config: str
    seconds: float
    latencies: dict[str, list[float]] = field(default_factory=dict)
    texts: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)

    def median_ms(self, tenant: str) -> float:
        """NaN when no request of `tenant` was answered (the window was too short for the machine)."""
        return statistics.median(self.latencies[tenant]) * 1e3 if self.latencies[tenant] else math.nan

    def p90_ms(self, tenant: str) -> float:
        ordered = sorted(self.latencies[tenant])
        return ordered[min(len(ordered) - 1, round(0.9 * len(ordered)))] * 1e3 if ordered else math.nan

    @property
    def texts_per_s(self) -> float:
        return self.texts / self.seconds


def tenants_toml() -> str:
    return "".join(f'[tenants.{tenant}]\nkeys = ["sha256:{hashlib.sha256(key.encode()).hexdigest()}"]\n\n'
                   for tenant, key in KEYS.items())


def run(seconds: float = 60.0, warmup_s: float = 15.0, threads: int = 1) -> list[Load]:
    backbone = Backbone.load(device="cpu")
    deltas = {name: make_method_delta(backbone, "lora", i).to_bytes()
              for i, name in enumerate(("flood-a", "flood-b", "light-a"))}
    texts = [" ".join(sentences(2, seed=i)) for i in range(64)]
    loads = []
    for config in ("tenants", "no tenants"):
        with tempfile.TemporaryDirectory() as folder:
            extra = ["--admin-token", ADMIN]
            if config == "tenants":
                tenants = Path(folder) / "tenants.toml"
                tenants.write_text(tenants_toml())
                extra += ["--tenants-file", str(tenants)]
            server = ServerProcess(Path(folder) / "store", threads, extra=extra)
            try:
                for name, data in deltas.items():
                    owner = name.split("-")[0] if config == "tenants" else None
                    key = KEYS[owner] if owner else ADMIN
                    httpx.put(f"{server.url}/tasks/{name}", content=data, timeout=120,
                              headers={"Authorization": f"Bearer {key}"}).raise_for_status()
                auth = config == "tenants"
                loads.append(asyncio.run(_load(server.url, config, texts, seconds, warmup_s, auth)))
            finally:
                server.stop()
        print(f"fair share, {config}: {summary(loads[-1])}", flush=True)
    return loads


async def _load(url: str, config: str, texts: list[str], seconds: float, warmup_s: float, auth: bool) -> Load:
    load = Load(config, seconds, {t: [] for t in KEYS}, 0, dict.fromkeys(KEYS, 0), dict.fromkeys(KEYS, 0))
    began = time.perf_counter()
    measuring_from, until = began + warmup_s, began + warmup_s + seconds
    limits = httpx.Limits(max_connections=FLOOD_CLIENTS + 4, max_keepalive_connections=FLOOD_CLIENTS + 4)

    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:

        async def tenant_client(tenant: str, number: int, size: int, task: str) -> None:
            headers = {"Authorization": f"Bearer {KEYS[tenant] if auth else ADMIN}"}
            i = number
            while time.perf_counter() < until:
                inputs = [texts[(i + j) % len(texts)] for j in range(size)]
                i += 7
                started = time.perf_counter()
                response = await client.post(f"/tasks/{task}/predict", json={"inputs": inputs}, headers=headers)
                ended = time.perf_counter()
                if response.status_code == 429:
                    load.refused[tenant] += started >= measuring_from
                    await asyncio.sleep(0.1)
                    continue
                if response.status_code != 200:
                    load.errors[tenant] += 1
                    continue
                if started >= measuring_from:  # started in the window: timed to its end
                    load.latencies[tenant].append(ended - started)
                if measuring_from <= ended <= until:  # answered in the window: counts for throughput
                    load.texts += size

        await asyncio.gather(
            *(tenant_client("flood", n, FLOOD_TEXTS, ("flood-a", "flood-b")[n % 2]) for n in range(FLOOD_CLIENTS)),
            tenant_client("light", 0, 1, "light-a"))
    return load


def summary(load: Load) -> str:
    return (f"light median {load.median_ms('light'):.0f} ms, flood median {load.median_ms('flood'):.0f} ms, "
            f"{load.texts_per_s:.1f} texts/s, 429s {load.refused}, errors {load.errors}")


def section(loads: list[Load], when: str, commit: str, machine: str, uptime: str) -> str:
    by = {load.config: load for load in loads}
    fair, fifo = by["tenants"], by["no tenants"]
    lines = [
        f"### Fair share between tenants (`python -m bench --fair-share`) — {when}, commit {commit}",
        "",
        f"Machine: {machine}; shared with other engineers' tests and jobs while it ran (`uptime` at the start: "
        f"{uptime}), so absolute figures are noisy; both configurations ran back to back. One tenant floods "
        f"({FLOOD_CLIENTS} clients × {FLOOD_TEXTS} texts a request, two tasks), another sends one text at a time "
        f"(one client, one task); {fair.seconds:.0f} s measured after a warm-up, MiniLM, `--threads 1`.",
        "",
        "| configuration | light median ms | light p90 ms | flood median ms | flood p90 ms | light ÷ flood median "
        "| texts/s answered | 429s (flood / light) | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for load in (fair, fifo):
        lines.append(
            f"| {load.config} | {load.median_ms('light'):.0f} | {load.p90_ms('light'):.0f} "
            f"| {load.median_ms('flood'):.0f} | {load.p90_ms('flood'):.0f} "
            f"| **{load.median_ms('light') / load.median_ms('flood'):.2f}** | {load.texts_per_s:.1f} "
            f"| {load.refused['flood']} / {load.refused['light']} | {sum(load.errors.values())} |")
    lines += [
        "",
        f"Throughput with tenants ÷ without: **{fair.texts_per_s / fifo.texts_per_s:.2f}×** (the bar: ≥ 0.95×). "
        f"The light tenant's median ÷ the flooding tenant's: {fair.median_ms('light') / fair.median_ms('flood'):.2f} "
        f"with tenants (the bar: ≤ 0.5), {fifo.median_ms('light') / fifo.median_ms('flood'):.2f} without.",
    ]
    return "\n".join(lines) + "\n"
