"""Engine throughput: a batch mixing 16 tasks against the dense backbone on the same batch.

    python -m bench.engine [--batch 32] [--tokens 64] [--tasks 16] [--repeats 7]

Dense and mixed runs are interleaved (dense, mixed, dense, mixed, ...) and each side's median
is taken, so a noisy neighbour on this shared machine hits both sides alike. Prints a
Markdown table and, with --write, appends it to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time
from datetime import date
from pathlib import Path

import torch

from bench.workload import make_method_delta, texts_of_exact_length
from server.backbone import Backbone
from server.delta import prepare_delta
from server.engine import Engine, Row

ROOT = Path(__file__).resolve().parents[1]


def _median_seconds(fn, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run(batch: int, tokens: int, tasks: int, repeats: int, methods: list[str]) -> list[dict[str, object]]:
    backbone = Backbone.load()
    engine = Engine(backbone)
    texts = texts_of_exact_length(backbone, batch, tokens)
    results = []
    for method in methods:
        deltas = [make_method_delta(backbone, method, seed) for seed in range(tasks)]
        prepared = [prepare_delta(d.to_bytes(), backbone, f"{method}-{i}", 1) for i, d in enumerate(deltas)]
        rows = [Row(prepared[i % tasks], text) for i, text in enumerate(texts)]
        engine.forward(rows)  # warm-up: allocates scratch buffers, LUTs
        engine.forward_dense(texts)
        dense_times, mixed_times = [], []
        for _ in range(repeats):
            dense_times.append(_median_seconds(lambda: engine.forward_dense(texts), 1))
            mixed_times.append(_median_seconds(lambda r=rows: engine.forward(r), 1))
        dense, mixed = statistics.median(dense_times), statistics.median(mixed_times)
        results.append({
            "method": method,
            "dense_seq_s": batch / dense,
            "mixed_seq_s": batch / mixed,
            "ratio": dense / mixed,
            "delta_bytes": sum(len(d.to_bytes()) for d in deltas) // tasks,
            "resident_bytes": sum(p.nbytes for p in prepared) // tasks,
            "load_ms": statistics.median(p.load_seconds for p in prepared) * 1e3,
        })
        print(f"{method:6s} dense {batch / dense:7.1f} seq/s  mixed {batch / mixed:7.1f} seq/s  "
              f"ratio {dense / mixed:.3f}", flush=True)
    return results


def table(results: list[dict[str, object]], batch: int, tokens: int, tasks: int) -> str:
    lines = [
        f"| method ({tasks} tasks in the batch) | dense backbone seq/s | mixed batch seq/s | ratio to dense "
        "| delta file bytes / task | resident bytes / task | prepare ms / task |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['method']} | {r['dense_seq_s']:.1f} | {r['mixed_seq_s']:.1f} | **{r['ratio']:.2f}×** "
            f"| {r['delta_bytes']:,} | {r['resident_bytes']:,} | {r['load_ms']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--methods", default="pasta,lora,mask,dsee,mix")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--write", action="store_true", help="append the table to BENCHMARKS.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run(args.batch, args.tokens, args.tasks, args.repeats, args.methods.split(","))
    md = table(results, args.batch, args.tokens, args.tasks)
    header = (f"### Engine, MiniLM, batch {args.batch} × {args.tokens} tokens, {args.tasks} tasks — "
              f"{date.today().isoformat()}, commit {commit()}\n\nMachine: {machine()}. "
              f"Median of {args.repeats} interleaved runs per side.\n\n")
    print(header + md)
    if args.write:
        path = ROOT / "BENCHMARKS.md"
        existing = path.read_text() if path.exists() else "# Benchmarks\n"
        path.write_text(existing.rstrip() + "\n\n" + header + md + "\n")


if __name__ == "__main__":
    main()
