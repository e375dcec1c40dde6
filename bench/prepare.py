"""Host time of `Engine.prepare` (collate, pad, plan, PASTA) against the number of tasks in a batch.

    python -m bench.prepare                      # MiniLM, 64 × 128 tokens, k = 1, 16, 64, mixed methods
    python -m bench.prepare --backend cpu --ks 1,64

The batcher prepares the next batch while the current one runs, so on a GPU this host time is
hidden only while it stays below the forward's; and it must not grow with k (issue 22: within
1.2× of k = 1 at k = 64). Runs without a GPU: for the `triton` backend the plan is built exactly
as on a GPU (device tables on the CPU; the kernels are not run). Median of `--repeats` after one
warm-up batch per k (which assigns the tasks' slots).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench.workload import make_method_delta, texts_of_exact_length
from server.backbone import Backbone
from server.delta import prepare
from server.engine import Engine, Row


def measure(backend: str, ks: list[int], batch: int, tokens: int, repeats: int, method: str) -> dict[int, float]:
    backbone = Backbone.load(None, backend=backend)
    engine = Engine(backbone)
    texts = texts_of_exact_length(backbone, batch, tokens)
    result = {}
    for k in ks:
        deltas = [prepare(make_method_delta(backbone, method, seed), backbone, f"t{seed}", 1) for seed in range(k)]
        rows = [Row(deltas[i % k], text) for i, text in enumerate(texts)]
        engine.prepare(rows)  # warm-up: slots, allocator
        samples = []
        for _ in range(repeats):
            started = time.perf_counter()
            engine.prepare(rows)
            samples.append(time.perf_counter() - started)
        result[k] = statistics.median(samples)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="triton", choices=["triton", "cpu"])
    parser.add_argument("--ks", default="1,16,64")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--method", default="mix")
    args = parser.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    times = measure(args.backend, ks, args.batch, args.tokens, args.repeats, args.method)
    print(f"Engine.prepare, {args.backend} backend, MiniLM, {args.batch} × {args.tokens} tokens, "
          f"{args.method} tasks, median of {args.repeats} ({torch.get_num_threads()} threads):")
    for k, seconds in times.items():
        print(f"  k = {k:3d}: {seconds * 1000:7.2f} ms  ({seconds / times[ks[0]]:.2f}× k = {ks[0]})")


if __name__ == "__main__":
    main()
