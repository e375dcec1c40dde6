"""The engine on a GPU: grouped Triton kernels against the dense ceiling and every baseline.

    python -m bench.gpu --quick                  # MiniLM, k = 1, 16, 64, every method: < 4 min on one H100
    python -m bench.gpu                          # MiniLM; add --mpnet PATH for the 12-layer MPNet base
    python -m bench.gpu --ks 1,16,64 --methods pasta,lora,mask,dsee,mix --batch 64 --tokens 128
    python -m bench.gpu --http                   # also the HTTP server on the GPU (64 clients, 16 tasks)

Per point (model, method, k distinct tasks in a batch of `batch` × `tokens`), all in one run,
interleaved, medians of `--repeats`, each call timed with CUDA events:

- `dense`     — run only: the plain backbone's forward on the batch, padded beforehand (the ceiling);
- `grouped`   — run only: the backbone's forward with the `triton` backend's plans and PASTA active,
                the batch prepared beforehand — the same work as `dense` plus the tasks' parts;
- `grouped e2e` — the engine's whole `forward` (prepare: collate, pad, plan, PASTA; run; heads;
                copy back), what a batch costs the server;
- `segmented` — the engine's whole `forward` with the `cpu` backend (per task segment) on the same
                GPU: the previous engine, for the "≥ 3× at k = 64" target (compared end to end);
- `peft`      — PEFT's mixed batch (`adapter_names`) for LoRA, end to end;
- `copies`    — one full model copy per task, rows grouped by task, where memory allows, end to end.

`× dense` is dense's time over grouped's (run only both: the fraction of the ceiling reached);
the other ratios compare grouped e2e with that side. k is the number of distinct tasks in the
batch: a k above the batch size is skipped (it could only repeat the batch-size point). The
Triton kernels are warmed up first (`triton_ops.warm_up`, as the server does at start), so no
timing includes a compile. Logits of `grouped` are checked against `segmented` (same precision)
at every first point of a method. Device memory per task is measured
(`torch.cuda.memory_allocated` around preparing k tasks) and compared with the delta's bytes.
Results go to the GPU section of BENCHMARKS.md (`--write`) with the device, CUDA and Triton versions.

Without a GPU this only runs as a smoke test of its own logic (`--allow-cpu`: Triton's
interpreter, tiny shapes), which is how CI keeps it working.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench.baselines import PeftMixed, TaskCopies, max_difference, plain_copy
from bench.engine import commit
from bench.workload import make_method_delta, texts_of_exact_length
from server.backbone import Backbone
from server.delta import prepare
from server.engine import Engine, Row

ROOT = Path(__file__).resolve().parents[1]
SIDES = ("dense", "grouped", "grouped e2e", "segmented", "peft", "copies")
QUICK = {"ks": "1,16,64", "methods": "pasta,lora,mask,dsee,mix", "repeats": 5, "copies_gib": 0.0}


@dataclass
class GpuPoint:
    model: str
    method: str
    tasks: int
    seconds: dict[str, float] = field(default_factory=dict)
    bytes_per_task: float = 0.0
    device_bytes_per_task: float = 0.0
    max_diff: float | None = None

    def ratio(self, side: str) -> float | None:
        """grouped's speed over `side`'s: run only against dense (the fraction of the ceiling reached),
        end to end against the other engines."""
        mine = "grouped" if side == "dense" else "grouped e2e"
        if side not in self.seconds or mine not in self.seconds or side == mine:
            return None
        return self.seconds[side] / self.seconds[mine]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call: CUDA events on a GPU (what the device spent between the two marks,
    host gaps included, without a synchronisation inside the timed span), else the wall clock."""
    if device.type != "cuda":
        started = time.perf_counter()
        fn()
        return time.perf_counter() - started
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000


def _median_seconds(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, float]:
    for fn in fns.values():  # warm-up: allocator, cuBLAS handles, slots
        fn()
    samples: dict[str, list[float]] = {side: [] for side in fns}
    for _ in range(repeats):
        for side, fn in fns.items():
            samples[side].append(_time_once(fn, device))
    return {side: statistics.median(values) for side, values in samples.items()}


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def run(model_path: str | None, model_label: str, ks: list[int], methods: list[str], batch: int, tokens: int,
        repeats: int, device: torch.device, dtype: torch.dtype, copies_budget: int) -> list[GpuPoint]:
    grouped_backbone = Backbone.load(model_path, device=device, dtype=dtype, backend="triton")
    segmented_backbone = Backbone.load(model_path, device=device, dtype=dtype, backend="cpu")
    pristine = plain_copy(segmented_backbone.model)  # before any engine swaps its modules
    grouped, segmented = Engine(grouped_backbone), Engine(segmented_backbone)
    from server.backends import triton_ops

    print(f"{model_label}: Triton kernels warmed up in {triton_ops.warm_up(grouped_backbone):.1f} s", flush=True)
    texts = texts_of_exact_length(grouped_backbone, batch, tokens)
    dense_batch = grouped.pad_dense(texts)
    model_bytes = grouped_backbone.parameter_bytes
    points: list[GpuPoint] = []
    for method in methods:
        checked = False
        for k in ks:
            if k > batch:
                print(f"{model_label} {method} k={k}: skipped, a batch of {batch} rows holds at most {batch} tasks",
                      flush=True)
                continue
            deltas = [make_method_delta(grouped_backbone, method, seed) for seed in range(k)]
            before = _allocated(device)
            fast = [prepare(d, grouped_backbone, f"{method}-{i}", 1) for i, d in enumerate(deltas)]
            _sync(device)
            point = GpuPoint(model_label, method, k)
            point.device_bytes_per_task = (_allocated(device) - before) / k
            point.bytes_per_task = sum(d.nbytes for d in deltas) / k
            slow = [prepare(d, segmented_backbone, f"{method}-{i}", 1, keep_source=True) for i, d in enumerate(deltas)]
            rows = [Row(fast[i % k], t) for i, t in enumerate(texts)]
            slow_rows = [Row(slow[i % k], t) for i, t in enumerate(texts)]
            pairs = [(slow[i % k], t) for i, t in enumerate(texts)]
            planned = grouped.prepare(rows)
            assert len({id(row.delta) for row in rows}) == k  # the label is the batch's distinct tasks
            fns: dict[str, Callable[[], object]] = {
                "dense": lambda: grouped.run_dense(dense_batch),
                "grouped": lambda p=planned: grouped.run_backbone(p),
                "grouped e2e": lambda r=rows: grouped.forward(r),
                "segmented": lambda r=slow_rows: segmented.forward(r),
            }
            if method == "lora":
                peft = PeftMixed(segmented_backbone, pristine, slow)
                fns["peft"] = lambda p=pairs, m=peft: m.forward(p)
            copies = None
            if k * model_bytes <= copies_budget:
                copies = TaskCopies(segmented_backbone, pristine, slow)
                fns["copies"] = lambda p=pairs, c=copies: c.forward(p)
            if not checked:
                point.max_diff = max_difference(grouped.forward(rows), segmented.forward(slow_rows))
                checked = True
            point.seconds = _median_seconds(fns, repeats, device)
            points.append(point)
            del copies, fns
            print(f"{model_label} {method:5s} k={k:3d} grouped {batch / point.seconds['grouped e2e']:8.1f} seq/s  "
                  + "  ".join(f"{s} {point.ratio(s):.2f}×" for s in SIDES
                              if s != "grouped" and point.ratio(s) is not None)
                  + f"  device B/task {point.device_bytes_per_task:,.0f} (delta {point.bytes_per_task:,.0f})",
                  flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return points


def _http(model_path: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """The real server (`python -m server serve`, backend and dtype chosen by device) under 64 clients."""
    from bench import http
    from bench.workload import METHODS, sentences

    backbone = Backbone.load(model_path, device=device, dtype=dtype)
    engine = Engine(backbone)
    deltas = [make_method_delta(backbone, METHODS[i % len(METHODS)], i).to_bytes() for i in range(16)]
    texts = [" ".join(sentences(2, seed=i)) for i in range(64)]
    levels = http.run(backbone, engine, deltas, texts, {64: 640}, threads=4)
    lines = ["| clients | requests | errors | server seq/s | engine offline seq/s | ratio | p50 ms | p99 ms |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {lv.clients} | {lv.requests} | {lv.errors} | {lv.seq_per_s:.1f} | {lv.offline_seq_per_s:.1f} "
              f"| {lv.ratio:.2f}× | {lv.p50_ms:.0f} | {lv.p99_ms:.0f} |" for lv in levels]
    return "HTTP server on this device, 16 mixed tasks (pasta, lora, mask, dsee), one input per request:\n\n" \
        + "\n".join(lines)


def versions(device: torch.device) -> str:
    import triton

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return f"{name}, CUDA {torch.version.cuda}, torch {torch.__version__}, Triton {triton.__version__}"
    return (f"CPU (Triton interpreter: a smoke run, not a measurement), torch {torch.__version__}, "
            f"Triton {triton.__version__}")


def table(points: list[GpuPoint]) -> str:
    lines = ["| model | method | k | grouped run ms | dense run ms | × dense (run) | grouped e2e ms | × segmented "
             "| × PEFT | × copies | device B/task | delta B/task | max |Δ| vs segmented |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        def cell(side: str, point: GpuPoint = p) -> str:
            r = point.ratio(side)
            return "–" if r is None else f"{r:.2f}×"

        def ms(side: str, point: GpuPoint = p) -> str:
            return f"{point.seconds[side] * 1e3:.2f}" if side in point.seconds else "–"
        lines.append(f"| {p.model} | {p.method} | {p.tasks} | {ms('grouped')} | {ms('dense')} | {cell('dense')} "
                     f"| {ms('grouped e2e')} | {cell('segmented')} | {cell('peft')} | {cell('copies')} "
                     f"| {p.device_bytes_per_task:,.0f} | {p.bytes_per_task:,.0f} "
                     f"| {'' if p.max_diff is None else f'{p.max_diff:.2e}'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default=None, help="model folder (default: the packaged MiniLM)")
    parser.add_argument("--mpnet", default=None, help="also run the 12-layer MPNet base from this folder")
    parser.add_argument("--quick", action="store_true",
                        help=f"MiniLM only, {QUICK['ks']} tasks, every method, {QUICK['repeats']} repeats, no copies")
    parser.add_argument("--ks", default="1,16,64")
    parser.add_argument("--methods", default="pasta,lora,mask,dsee,mix")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    parser.add_argument("--copies-gib", type=float, default=40.0, help="device memory allowed for per-task copies")
    parser.add_argument("--allow-cpu", action="store_true", help="smoke-run on CPU in Triton's interpreter")
    parser.add_argument("--http", action="store_true",
                        help="also the HTTP server on this device: 64 clients, 16 mixed tasks, vs the engine offline")
    parser.add_argument("--write", action="store_true", help="append the section to BENCHMARKS.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.ks, args.methods, args.repeats, args.copies_gib = (QUICK["ks"], QUICK["methods"], QUICK["repeats"],
                                                                QUICK["copies_gib"])
        args.mpnet = None
    if torch.cuda.is_available():
        device, dtype = torch.device("cuda"), getattr(torch, args.dtype)
    elif args.allow_cpu:
        device, dtype = torch.device("cpu"), torch.float32
    else:
        raise SystemExit("bench.gpu needs a CUDA GPU (use --allow-cpu for a smoke run in Triton's interpreter)")
    ks = [int(k) for k in args.ks.split(",")]
    methods = args.methods.split(",")
    budget = int(args.copies_gib * 2**30)
    models = [(args.backbone, "MiniLM-L6" if args.backbone is None else Path(args.backbone).name)]
    if args.mpnet:
        models.append((args.mpnet, "MPNet-base"))
    points: list[GpuPoint] = []
    for path, label in models:
        points += run(path, label, ks, methods, args.batch, args.tokens, args.repeats, device, dtype, budget)
    http_lines = ""
    if args.http:
        http_lines = "\n" + _http(None, device, dtype) + "\n"  # the server runs the packaged MiniLM
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = (f"### GPU engine, batch {args.batch} × {args.tokens} tokens, {args.dtype} — {now}, commit {commit()}\n\n"
               f"Device: {versions(device)}. Median of {args.repeats} interleaved runs per side, CUDA events; "
               f"× dense = dense run time over grouped run time (fraction of the ceiling); other ratios: grouped "
               f"end to end against that side end to end.\n\n{table(points)}\n"
               f"{http_lines}")
    print(section)
    if args.write:
        path = ROOT / "BENCHMARKS.md"
        path.write_text(path.read_text().rstrip() + "\n\n" + section)


if __name__ == "__main__":
    main()
