"""Served throughput on a mixed workload, as a client sees it, against the dense ceiling (issue 11).

    python -m bench.served [--requests 400] [--rounds 2] [--clients 64] [--write] [--profile FILE]
                           [--compare before=/path/to/old/checkout] [--compare t4096=.,--max-batch-tokens=4096]

Two workloads, each 16 tasks on one real `python -m server serve` (uvicorn subprocess, loopback,
1 torch thread), driven by `--clients` concurrent asyncio clients:

- mixed:      4 keep-mask tasks (10 % zeros), 4 PASTA, 4 DSEE-like (keep + low rank + sparse),
              4 LoRA (bench/workload.py puts each method's parts where its paper does);
- pasta+lora: 8 PASTA and 8 LoRA tasks.

Each request carries 1–4 SST-2 dev sentences for a random task of its workload (fixed seed; the
same requests every round). The ceiling is the plain dense backbone — no task parts — on the very
sentences those requests carry, pre-tokenised, in *length-bucketed* batches of 32 (sorted by
length, then cut), run in this process while the server idles. The same sentences in arrival
order (batches of 32 as they come) show what padding alone costs, and the engine offline on the
same bucketed batches (each row with its request's task) what the task parts cost. Rounds interleave the sides
(dense bucketed, dense arrival order, served mixed, served pasta+lora); medians of the rounds,
latency percentiles over every request of every round. Ratio = served sentences/s ÷ dense
bucketed sentences/s, both measured in the same round (median over rounds).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import random
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx
import torch

from bench.engine import commit, machine
from bench.http import ServerProcess, _percentile
from bench.profile import summarise
from bench.profile import table as profile_table
from bench.workload import DATA, make_method_delta
from server.backbone import Backbone
from server.delta import prepare_delta
from server.engine import Engine, Row

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS: dict[str, tuple[str, ...]] = {
    "mixed": ("mask",) * 4 + ("pasta",) * 4 + ("dsee",) * 4 + ("lora",) * 4,
    "pasta+lora": ("pasta",) * 8 + ("lora",) * 8,
}
MASK_ZEROS = 0.10
DENSE_BATCH = 32
SPY_RATE = 100


def dev_sentences() -> list[str]:
    """SST-2 dev sentences (872); generated ones where the shared data is absent."""
    path = DATA / "sst2" / "dev.tsv"
    if path.exists():
        with path.open(newline="") as handle:
            return [r["sentence"].strip() for r in csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)]
    rng = random.Random(0)
    words = ["the", "film", "is", "a", "quietly", "moving", "and", "often", "funny", "story", "of", "love"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 45))) for _ in range(872)]


@dataclass(frozen=True)
class Request:
    task: str
    inputs: list[str]


def make_requests(tasks: list[str], sentences: list[str], count: int, seed: int = 0) -> list[Request]:
    rng = random.Random(seed)
    return [Request(rng.choice(tasks), rng.sample(sentences, rng.randint(1, 4))) for _ in range(count)]


def task_names(workload: str) -> list[str]:
    return [f"{workload.replace('+', '-')}-{method}-{i}" for i, method in enumerate(WORKLOADS[workload])]


@torch.inference_mode()
def dense_seconds(backbone: Backbone, texts: list, bucketed: bool) -> float:
    """The plain backbone over `texts` in batches of 32, sorted by length first when `bucketed`."""
    order = sorted(texts, key=lambda t: len(t.input_ids)) if bucketed else list(texts)
    batches = [backbone.pad(order[i : i + DENSE_BATCH]) for i in range(0, len(order), DENSE_BATCH)]
    started = time.perf_counter()
    for inputs in batches:
        backbone.model(**inputs)
    return time.perf_counter() - started


@torch.inference_mode()
def engine_seconds(engine: Engine, rows: list[Row]) -> float:
    """The engine, offline, on the workload's rows (each with its request's task) in length-bucketed batches
    of 32: the dense bucketed ceiling plus the task parts, no server around it."""
    order = sorted(rows, key=lambda r: len(r.text.input_ids))
    started = time.perf_counter()
    for i in range(0, len(order), DENSE_BATCH):
        engine.forward(order[i : i + DENSE_BATCH])
    return time.perf_counter() - started


def padding_fraction(texts: list, bucketed: bool) -> float:
    lengths = [len(t.input_ids) for t in texts]
    if bucketed:
        lengths.sort()
    padded = sum(max(lengths[i : i + DENSE_BATCH]) * len(lengths[i : i + DENSE_BATCH])
                 for i in range(0, len(lengths), DENSE_BATCH))
    return 1 - sum(lengths) / padded


async def drive(url: str, requests: list[Request], clients: int, timeout: float = 120.0,
                ) -> tuple[float, list[float], dict[int, int]]:
    """(wall seconds, per-request latencies, status counts other than 200; 0 = no answer)."""
    latencies: list[float] = []
    errors: dict[int, int] = {}
    pending = iter(requests)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:

        async def worker() -> None:
            for request in pending:
                started = time.perf_counter()
                try:
                    response = await client.post(f"/tasks/{request.task}/predict", json={"inputs": request.inputs})
                    status = response.status_code
                except httpx.HTTPError:  # a reset connection (e.g. after a 500) counts, and the run goes on
                    status = 0
                latencies.append(time.perf_counter() - started)
                if status != 200:
                    errors[status] = errors.get(status, 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return time.perf_counter() - started, latencies, errors


@dataclass
class Result:
    workload: str
    server: str  # which server build answered ("this" or a --compare label)
    requests: int
    sentences: int
    served_s: list[float] = field(default_factory=list)
    bucketed_s: list[float] = field(default_factory=list)
    arrival_s: list[float] = field(default_factory=list)
    engine_s: list[float] = field(default_factory=list)  # the engine offline, bucketed (task parts' cost)
    latencies: list[float] = field(default_factory=list)
    errors: dict[int, int] = field(default_factory=dict)
    engine_busy_s: float = 0.0  # the server's own batch seconds, tokens and padded tokens over all rounds
    tokens: float = 0.0
    padded: float = 0.0
    batches: float = 0.0
    profile: str = ""
    padding_bucketed: float = 0.0
    padding_arrival: float = 0.0

    def rate(self, seconds: list[float]) -> float:
        return self.sentences / statistics.median(seconds)

    @property
    def ratio(self) -> float:
        """Median over rounds of each round's served ÷ dense bucketed (the two sides ran back to back)."""
        return statistics.median(b / s for s, b in zip(self.served_s, self.bucketed_s, strict=True))

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.latencies) * 1e3

    @property
    def p99_ms(self) -> float:
        return _percentile(self.latencies, 0.99) * 1e3


def run(requests: int = 400, rounds: int = 2, clients: int = 64, threads: int = 1, seed: int = 0,
        server_args: list[str] | None = None, profile: Path | None = None,
        workloads: tuple[str, ...] = tuple(WORKLOADS), compare: dict[str, Path] | None = None) -> list[Result]:
    """`compare` maps a label to another checkout whose server is measured beside this one, interleaved."""
    torch.set_num_threads(threads)
    backbone = Backbone.load()
    sentences = dev_sentences()
    roots = {"this": ROOT, **(compare or {})}
    extra = {label: [] for label in roots}
    for label, root in list(roots.items()):  # "PATH,--flag=value,...": that server's own flags
        path, *flags = str(root).split(",")
        roots[label], extra[label] = Path(path), flags
    plans = {w: make_requests(task_names(w), sentences, requests, seed) for w in workloads}
    results: dict[tuple[str, str], Result] = {}
    encoded: dict[str, list] = {}
    for w, reqs in plans.items():
        texts = [s for r in reqs for s in r.inputs]
        encoded[w] = backbone.encode(texts)
        for label in roots:
            results[w, label] = Result(w, label, len(reqs), len(texts),
                                       padding_bucketed=padding_fraction(encoded[w], True),
                                       padding_arrival=padding_fraction(encoded[w], False))
    deltas = {w: [make_method_delta(backbone, method, seed=1000 + i, mask_zeros=MASK_ZEROS).to_bytes()
                  for i, method in enumerate(WORKLOADS[w])] for w in workloads}
    engine = Engine(backbone)  # its MixedLinears with no plan are plain linears: the dense side is unchanged
    prepared = {w: {name: prepare_delta(data, backbone, name, 1) for name, data in
                    zip(task_names(w), deltas[w], strict=True)} for w in workloads}
    rows = {w: [Row(prepared[w][r.task], text) for r, text in
                zip((r for r in plans[w] for _ in r.inputs), encoded[w], strict=True)] for w in workloads}
    servers: dict[str, ServerProcess] = {}
    with tempfile.TemporaryDirectory() as stores:
        try:
            for label, root in roots.items():
                servers[label] = server = ServerProcess(Path(stores) / label, threads, root=root,
                                                        extra=[*(server_args or []), *extra[label]])
                for w in workloads:
                    for name, data in zip(task_names(w), deltas[w], strict=True):
                        httpx.put(f"{server.url}/tasks/{name}", content=data, timeout=120,
                                  headers={"content-type": "application/octet-stream"}).raise_for_status()
                    # Warm-up: every task loaded into the cache, the allocator and thread pools warm.
                    asyncio.run(drive(server.url, [Request(n, ["warm up"]) for n in task_names(w)] * 2, 8))
            dense_seconds(backbone, encoded[workloads[0]][:64], True)
            for round_index in range(rounds):
                for w in workloads:
                    bucketed = dense_seconds(backbone, encoded[w], True)
                    arrival = dense_seconds(backbone, encoded[w], False)
                    offline = engine_seconds(engine, rows[w])
                    labels = list(roots)
                    labels = labels[round_index % len(labels):] + labels[: round_index % len(labels)]
                    for label in labels:
                        result = results[w, label]
                        result.bucketed_s.append(bucketed)
                        result.arrival_s.append(arrival)
                        result.engine_s.append(offline)
                        first = profile and round_index == 0 and w == workloads[0] and label == "this"
                        spy = _py_spy(servers[label], profile) if first else None
                        before = server_counters(servers[label].url)
                        wall, latencies, errors = asyncio.run(drive(servers[label].url, plans[w], clients))
                        if spy is not None:
                            spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
                            spy.wait(60)
                            result.profile = profile_table(summarise(profile, wall, SPY_RATE))
                        after = server_counters(servers[label].url)
                        result.engine_busy_s += after["busy"] - before["busy"]
                        result.tokens += after["tokens"] - before["tokens"]
                        result.padded += after["padded"] - before["padded"]
                        result.batches += after["batches"] - before["batches"]
                        result.served_s.append(wall)
                        result.latencies += latencies
                        for code, n in errors.items():
                            result.errors[code] = result.errors.get(code, 0) + n
                        print(f"round {round_index} {w:10s} {label:8s} served {result.sentences / wall:6.1f} sent/s "
                              f"(dense bucketed {result.sentences / bucketed:6.1f}, engine offline bucketed "
                              f"{result.sentences / offline:6.1f}, arrival order "
                              f"{result.sentences / arrival:6.1f}), p50 {statistics.median(latencies) * 1e3:.0f} ms, "
                              f"p99 {_percentile(latencies, 0.99) * 1e3:.0f} ms, errors {errors or 0}", flush=True)
        finally:
            for server in servers.values():
                server.stop()
    return list(results.values())


def server_counters(url: str) -> dict[str, float]:
    """The server's engine seconds, batches, tokens and padded tokens so far (0 where it has no such metric)."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    names = {"busy": "deltaserve_batch_seconds_sum", "batches": "deltaserve_batch_seconds_count",
             "tokens": "deltaserve_batch_tokens_total", "padded": "deltaserve_batch_padded_tokens_total"}
    values = {}
    for key, name in names.items():
        found = re.search(rf"^{name} (\S+)$", text, re.M)
        values[key] = float(found.group(1)) if found else 0.0
    return values


def _py_spy(server: ServerProcess, out: Path) -> subprocess.Popen | None:
    """py-spy sampling the server's threads on the CPU for one served round (see bench/profile.py)."""
    exe = shutil.which("py-spy")
    if exe is None:
        print("py-spy not found: no profile")
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([exe, "record", "--pid", str(server.process.pid), "--format", "raw", "--threads",
                             "--rate", str(SPY_RATE), "--nonblocking", "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def section(results: list[Result], clients: int, rounds: int, seconds: float, server_args: list[str]) -> str:
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"### Served mixed workload (`python -m bench.served`) — {now}, commit {commit()}",
        "",
        f"Machine: {machine()}; a shared 2-core machine (other engineers' tests and jobs running), benchmarks "
        f"serialised through /work/quiet.sh. {clients} clients, {rounds} rounds, took {seconds:.0f} s. "
        f"Server flags: `{' '.join(server_args) or '(defaults)'}`.",
        "",
        "| workload | server | requests × rounds | sentences/round | errors | served sent/s | p50 ms | p99 ms "
        "| dense bucketed sent/s | **× dense bucketed** | dense arrival-order sent/s | engine offline bucketed sent/s "
        "| padding bucketed / arrival |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.workload} | {r.server} | {r.requests} × {rounds} | {r.sentences} | {sum(r.errors.values())} "
            f"| {r.rate(r.served_s):.1f} | {r.p50_ms:.0f} | {r.p99_ms:.0f} | {r.rate(r.bucketed_s):.1f} "
            f"| **{r.ratio:.2f}×** | {r.rate(r.arrival_s):.1f} | {r.rate(r.engine_s):.1f} "
            f"| {r.padding_bucketed:.0%} / {r.padding_arrival:.0%} |")
    decomposed = [r for r in results if r.padded]
    if decomposed:
        lines += [
            "",
            "Decomposition (from the server's own metrics over all rounds): × dense bucketed = padding factor "
            "× engine speed factor × engine busy factor. Padding factor = the dense bucketed batches' useful "
            "fraction of padded tokens ÷ the server's; busy = engine seconds ÷ served wall seconds; engine speed "
            "= the rest (task parts, per-batch Python, and CPU taken by the server's other threads and the client).",
            "",
            "| workload | server | batches/round | rows/batch | server padding | padding factor | engine busy "
            "| engine speed factor | of which task parts (offline engine ÷ dense, bucketed) | of which the rest |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in decomposed:
            server_useful = r.tokens / r.padded
            padding = server_useful / (1 - r.padding_bucketed)
            busy = r.engine_busy_s / sum(r.served_s)
            parts = r.rate(r.engine_s) / r.rate(r.bucketed_s)
            lines.append(f"| {r.workload} | {r.server} | {r.batches / rounds:.0f} "
                         f"| {r.sentences * rounds / r.batches:.1f} | {1 - server_useful:.0%} | {padding:.2f} "
                         f"| {busy:.0%} | {r.ratio / (padding * busy):.2f} | {parts:.2f} "
                         f"| {r.ratio / (padding * busy * parts):.2f} |")
    for r in results:
        if r.profile:
            lines += ["", f"Profile of the server ({r.workload}, {r.server}, round 0; py-spy, on-CPU samples):",
                      "", r.profile]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.served", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400, help="requests per workload and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--profile", type=Path, help="py-spy raw profile of the server during the first round")
    parser.add_argument("--server-arg", action="append", default=[], help="extra flag for the server (repeatable)")
    parser.add_argument("--compare", action="append", default=[], metavar="LABEL=PATH[,--flag=value...]",
                        help="also measure the server of another checkout (e.g. before=/tmp/old), or this one "
                             "with other flags (e.g. t4096=.,--max-batch-tokens=4096), interleaved")
    parser.add_argument("--write", action="store_true", help="append the section to BENCHMARKS.md")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    results = run(args.requests, args.rounds, args.clients, args.threads, server_args=args.server_arg,
                  profile=args.profile, workloads=tuple(args.workloads.split(",")),
                  compare={k: Path(v) for k, v in (c.split("=", 1) for c in args.compare)})
    text = section(results, args.clients, args.rounds, time.perf_counter() - started, args.server_arg)
    print(text)
    if args.write:
        path = ROOT / "BENCHMARKS.md"
        path.write_text(path.read_text().rstrip() + "\n\n" + text + "\n")


if __name__ == "__main__":
    main()
