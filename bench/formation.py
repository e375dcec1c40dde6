"""Batch formation policies on the served workload, offline: what padding and task mixing cost the engine.

    python -m bench.formation [--workload mixed] [--requests 240] [--queue 40] [--rounds 3]

No HTTP and no server: the issue-11 requests (bench/served.py) go through a simulated queue that
always holds `--queue` waiting requests (64 closed-loop clients, minus those in the running and
the prepared batch), each policy forms its batches from it, and the engine runs every policy's
batches in the same process, policies interleaved over rounds (medians), beside the dense
backbone on the same sentences in length-bucketed batches of 32 (the ceiling of bench.served).
This isolates what formation buys from the noise of a shared machine's HTTP path.

Policies: `fifo` — whole requests oldest first up to 64 requests or 8192 tokens (the batcher
before length-aware formation); `jobs-N` — `form_batch` over whole requests, N padded tokens;
`rows-N` — `form_batch` over rows (today's batcher), N padded tokens; 64 rows at most.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable

import torch

from bench.served import (
    DENSE_BATCH,
    MASK_ZEROS,
    WORKLOADS,
    dense_seconds,
    dev_sentences,
    make_requests,
    task_names,
)
from bench.workload import make_method_delta
from server.backbone import Backbone
from server.batching import Job, form_batch
from server.delta import prepare_delta
from server.engine import Engine, Row


def fifo(waiting: list[Job]) -> list[Job]:
    batch, tokens = [], 0
    for job in waiting:
        if len(batch) == 64 or (batch and tokens + job.tokens > 8192):
            break
        batch.append(job)
        tokens += job.tokens
    return batch


def simulate(jobs: list[Job], queue: int, policy: Callable[[list], list], rows: bool) -> list[list[tuple[Job, int]]]:
    """Batches (lists of (job, row index)) as the policy forms them from a queue kept `queue` requests deep."""
    arrivals = iter(jobs)
    waiting: list = []
    live: set[int] = set()
    batches = []
    while True:
        while len(live) < queue:
            job = next(arrivals, None)
            if job is None:
                break
            live.add(id(job))
            waiting.extend(job.items() if rows else [job])
        if not waiting:
            return batches
        batch = policy(waiting)
        chosen = {id(part) for part in batch}
        waiting = [part for part in waiting if id(part) not in chosen]
        still = {id(part.job if rows else part) for part in waiting}
        live &= still
        batches.append([(p.job, p.index) for p in batch] if rows else [(j, i) for j in batch for i in range(j.rows)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.formation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="mixed", choices=list(WORKLOADS))
    parser.add_argument("--requests", type=int, default=240)
    parser.add_argument("--queue", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--budgets", default="1024,2048,4096")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    backbone = Backbone.load()
    engine = Engine(backbone)
    names = task_names(args.workload)
    deltas = {n: prepare_delta(make_method_delta(backbone, m, seed=1000 + i, mask_zeros=MASK_ZEROS).to_bytes(),
                               backbone, n, 1)
              for i, (n, m) in enumerate(zip(names, WORKLOADS[args.workload], strict=True))}
    requests = make_requests(names, dev_sentences(), args.requests, 0)
    loop = asyncio.new_event_loop()
    jobs = [Job(r.task, r.inputs, backbone.encode(r.inputs), 128, future=loop.create_future()) for r in requests]
    texts = [e for j in jobs for e in j.encoded]
    policies: dict[str, tuple[Callable[[list], list], bool]] = {"fifo": (fifo, False)}
    for budget in map(int, args.budgets.split(",")):
        policies[f"jobs-{budget}"] = (lambda w, b=budget: form_batch(w, b, 64), False)
        policies[f"rows-{budget}"] = (lambda w, b=budget: form_batch(w, b, 64), True)
    formed = {name: simulate(jobs, args.queue, policy, rows) for name, (policy, rows) in policies.items()}
    batches = {name: [[Row(deltas[job.task], job.encoded[i]) for job, i in b] for b in bs]
               for name, bs in formed.items()}

    def run(name: str) -> float:
        started = time.perf_counter()
        for rows in batches[name]:
            engine.forward(rows)
        return time.perf_counter() - started

    times: dict[str, list[float]] = {name: [] for name in ("dense bucketed", *batches)}
    run("fifo")  # warm-up
    for r in range(args.rounds):
        order = list(times)
        order = order[r % len(order):] + order[: r % len(order)]
        for name in order:
            times[name].append(dense_seconds(backbone, texts, True) if name == "dense bucketed" else run(name))
    dense = statistics.median(times["dense bucketed"])
    print(f"{args.workload}: {len(jobs)} requests, {len(texts)} sentences, queue {args.queue} requests, "
          f"{args.rounds} rounds (dense bucketed: batches of {DENSE_BATCH})")
    print("| policy | batches | rows/batch | tasks/batch | padding | engine sent/s | × dense bucketed |")
    print("|---|---|---|---|---|---|---|")
    print(f"| dense bucketed (no task parts) | – | {DENSE_BATCH} | – | – | {len(texts) / dense:.1f} | 1.00 |")
    for name, bs in formed.items():
        rows = [len(b) for b in bs]
        tokens = sum(len(j.encoded[i].input_ids) for b in bs for j, i in b)
        padded = sum(max(len(j.encoded[i].input_ids) for j, i in b) * len(b) for b in bs)
        tasks = statistics.mean(len({j.task for j, _ in b}) for b in bs)
        seconds = statistics.median(times[name])
        print(f"| {name} | {len(bs)} | {statistics.mean(rows):.1f} | {tasks:.1f} | {1 - tokens / padded:.0%} "
              f"| {len(texts) / seconds:.1f} | {dense / seconds:.2f} |")


if __name__ == "__main__":
    main()
