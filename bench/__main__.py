"""`python -m bench`: every benchmark in one command; results appended to BENCHMARKS.md, plots in bench/plots/.

    python -m bench            # full: ≤ 10 min on a 2-core CPU with MiniLM
    python -m bench --quick    # ≤ 1 min: short texts, k ∈ {1, 16}, lora + mask + mix, dense/swap/PEFT
    python -m bench --no-write # print the section, leave BENCHMARKS.md and the plots alone
    python -m bench --soak     # only the soak: 10,000 mixed requests at 64 clients, RSS over time (bench/soak.py)
    python -m bench --fair-share  # only the fair share between a flooding and a light tenant (bench/fair_share.py)

Sections: engine throughput against the dense ceiling, per-task model copies, naive swapping
and PEFT's mixed batch; memory (computed and RSS-checked); cold load; the served mixed workload
against the dense backbone's length-bucketed throughput (bench/served.py); embeddings, bare and mixed with
classification, against the dense backbone (bench/embeddings.py); HTTP end to end; the fair share
between tenants (full runs only, bench/fair_share.py).
Nothing here asserts on speed; the baselines' logits are checked against the engine's.
"""

from __future__ import annotations

import argparse
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench import embeddings, fair_share, http, memory, report, served, soak
from bench.engine import commit, machine
from bench.suite import Workbench
from bench.workload import METHODS, sentences

PLOTS = Path(__file__).resolve().parent / "plots"


def grid(quick: bool) -> list[tuple[int, int, str, tuple[str, ...]]]:
    """(tokens, k, method, sides) per point, in run order."""
    if quick:
        return [(32, k, m, ("dense", "swap", "peft")) for m in ("lora", "mask", "mix") for k in (1, 16)]
    # Per-task copies cost a model copy per task to build: measured at k = 16, where the targets are.
    points = [(32, k, m, ("dense", "swap", "peft") + (("copies",) if k == 16 else ()))
              for m in (*METHODS, "mix") for k in (1, 4, 16, 64)]
    # Long texts cost 4× as much: k = 16 against every baseline, the mix's k = 1 and 64 against dense.
    points += [(128, 16, m, ("dense", "copies", "swap", "peft")) for m in (*METHODS, "mix")]
    points += [(128, k, "mix", ("dense",)) for k in (1, 64)]
    return points


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads here and in the server (default 1: on a busy 2-core machine two "
                             "threads wait on each other's stragglers; see BENCHMARKS.md)")
    parser.add_argument("--skip", default="",
                        help="comma-separated sections to skip: engine,memory,cold,served,embeddings,http,fair")
    parser.add_argument("--soak", action="store_true", help="run only the soak (bench/soak.py)")
    parser.add_argument("--soak-requests", type=int, default=10_000)
    parser.add_argument("--soak-clients", type=int, default=64)
    parser.add_argument("--fair-share", action="store_true", help="run only the fair share (bench/fair_share.py)")
    parser.add_argument("--fair-share-seconds", type=float, default=60.0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.soak:
        run_soak(args)
        return
    if args.fair_share:
        run_fair_share(args)
        return
    skip = set(filter(None, args.skip.split(",")))
    started = time.perf_counter()
    repeats = 1 if args.quick else 3
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    run = report.Run("quick" if args.quick else "full", machine(), now, commit(), args.threads, repeats)
    wb = Workbench()
    run.backbone_bytes = wb.backbone.parameter_bytes

    if "engine" not in skip:
        checked: set[tuple[str, int]] = set()
        for tokens, k, method, sides in grid(args.quick):
            check = (method, tokens) not in checked
            checked.add((method, tokens))
            point = wb.point(method, tokens, k, sides, repeats, copies_cap=16, check=check)
            run.points.append(point)
            print(f"{tokens:3d} tok k={k:2d} {method:5s} engine {point.seq_per_s('engine'):6.1f} seq/s  "
                  + "  ".join(f"{s} {point.ratio(s):.2f}×" for s in point.seconds if s != "engine"), flush=True)
        run.agreement = wb.agreement
        run.peft_hidden = wb.peft_hidden_difference()

    if "memory" not in skip:
        resident = {m: wb.task(m, 0).nbytes for m in METHODS}
        heads = {m: wb.task(m, 0).head.nbytes for m in METHODS}
        run.sizes = memory.sizes({m: wb.delta_bytes(m)[0] for m in METHODS}, resident, heads)
        if not args.quick:
            for method in (*METHODS, "full-copy"):
                run.rss.update(memory.rss_in_subprocess(method, 100 if method != "full-copy" else 4))

    if "cold" not in skip:
        run.cold = [wb.cold_load(m, 2 if args.quick else 9) for m in METHODS]
        for c in run.cold:
            print(f"cold load {c.method:5s} {c.total_ms:6.1f} ms", flush=True)

    if "served" not in skip:
        # Issue 11's workload: 64 clients, 16 tasks, 1-4 SST-2 dev sentences a request, against the dense
        # backbone's length-bucketed throughput measured in the same rounds.
        served_started = time.perf_counter()
        served_results = served.run(requests=60 if args.quick else 400, rounds=1 if args.quick else 2,
                                    threads=args.threads)
        run.extra_sections.append(served.section(served_results, 64, 1 if args.quick else 2,
                                                 time.perf_counter() - served_started, []))

    if "embeddings" not in skip:
        # Issue 21: the bare backbone's embeddings and embedding + classification tasks in one batch, against
        # the dense backbone on the same sentences (and sentence-transformers' own encode).
        run.extra_sections.append(embeddings.section(embeddings.run(rows=64, rounds=3 if args.quick else 7)))

    if "http" not in skip:
        deltas = [wb.delta_bytes(METHODS[i % len(METHODS)])[i // len(METHODS)] for i in range(16)]
        texts = [" ".join(sentences(2, seed=i)) for i in range(64)]
        # 64 clients x 10 rounds: a steady state, not mostly ramp-up and drain
        levels = {1: 4, 16: 16, 64: 64} if args.quick else {1: 24, 16: 160, 64: 640}
        run.http = http.run(wb.backbone, wb.engine, deltas, texts, levels, args.threads)

    if "fair" not in skip and not args.quick:
        now_fair = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        load_average = uptime()
        loads = fair_share.run(args.fair_share_seconds, threads=args.threads)
        run.extra_sections.append(fair_share.section(loads, now_fair, commit(), machine(), load_average))

    run.notes.append("Each task is a random delta with its method's real parts, sizes and placement "
                     "(bench/workload.py); 16 distinct deltas per method, prepared again under new names for k = 64.")
    run.notes.append(f"Threads: {args.threads}. On this shared 2-core machine torch with 2 threads was 2–20× slower "
                     "and far noisier than with 1 (one-row forward: 24 ms with 1 thread vs 160–530 ms with 2).")
    run.seconds = time.perf_counter() - started
    folder = PLOTS / "quick" if args.quick else PLOTS
    plots = {"throughput": folder / "throughput.png", "baselines": folder / "baselines.png",
             "memory": folder / "memory.png"}
    if not args.no_write:
        if run.points:
            report.plot_throughput(plots["throughput"], run.points)
            report.plot_baselines(plots["baselines"], run.points)
        if run.sizes:
            memory.plot(plots["memory"], run.backbone_bytes, run.sizes)
    text = report.section(run, plots)
    print(text)
    if not args.no_write:
        print(f"appended to {report.write(run, plots)}")


def run_soak(args: argparse.Namespace) -> None:
    result = soak.run(args.soak_requests, args.soak_clients, args.threads)
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = soak.section(result, now, commit(), machine())
    print(text)
    if not args.no_write:
        path = report.ROOT / "BENCHMARKS.md"
        path.write_text(path.read_text().rstrip() + "\n\n" + text)
        print(f"appended to {path}")


def uptime() -> str:
    """`uptime`'s load averages now: how busy the shared machine was when a benchmark started."""
    import subprocess

    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_fair_share(args: argparse.Namespace) -> None:
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load_average = uptime()
    loads = fair_share.run(args.fair_share_seconds, threads=args.threads)
    text = fair_share.section(loads, now, commit(), machine(), load_average)
    print(text)
    if not args.no_write:
        path = report.ROOT / "BENCHMARKS.md"
        path.write_text(path.read_text().rstrip() + "\n\n" + text)
        print(f"appended to {path}")


if __name__ == "__main__":
    main()
