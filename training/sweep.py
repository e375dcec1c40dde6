"""Experiments as a rerunnable script: runs of `deltaserve train` over tasks, methods, seeds and
settings, then one table of means over seeds and gaps to fine-tuning.

    python -m training.sweep --data DATA --tasks sst2,mrpc --methods finetune,mask,lora \\
        --seeds 42,43,44 --out runs/sweep
    python -m training.sweep --data DATA --tasks sst2 --methods lora --max-train-examples 3000 \\
        --grid lr=5e-4,1e-3 --grid lora-rank=8,16 --out runs/lora-sweep
    python -m training.sweep --summary runs/sweep          # the table only, from the reports

`DATA` holds the GLUE-style folders `sst2/` (train.tsv, dev.tsv), `mrpc/` (train.tsv,
dev.tsv) and `conll2003/` (train.txt, test.txt). Each run is a `python -m training train`
subprocess with `--threads 1` (one core each; `--jobs` runs that many at once) writing
`OUT/<run>.json`; a run whose report exists is skipped, so an interrupted sweep resumes.
Every grid value is a `deltaserve train` flag without its dashes (`lr`, `epochs`,
`lora-rank`...), applied to every method of the sweep; `method:flag=...` applies to one method.
Fine-tuning runs without grid values: it is the yardstick each point is compared with.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

# The data sets of RESULTS.md: files under --data, columns, and the metric each is judged on.
TASKS: dict[str, dict] = {
    "sst2": {"train": "sst2/train.tsv", "eval": "sst2/dev.tsv", "task_type": "sequence-classification",
             "flags": [], "headline": "accuracy", "label_names": "negative,positive"},
    "mrpc": {"train": "mrpc/train.tsv", "eval": "mrpc/dev.tsv", "task_type": "sequence-classification",
             "flags": ["--text-column", "#1 String", "--text-pair-column", "#2 String", "--label-column",
                       "Quality"], "headline": "f1", "label_names": None},
    "conll": {"train": "conll2003/train.txt", "eval": "conll2003/test.txt", "task_type": "token-classification",
              "flags": [], "headline": "f1", "label_names": None},
}
YARDSTICK = "finetune"


@dataclass(frozen=True)
class Run:
    task: str
    method: str
    seed: int
    settings: tuple[tuple[str, str], ...] = ()  # (flag without dashes, value), the grid point

    @property
    def point(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.settings) or "defaults"

    @property
    def name(self) -> str:
        tail = "".join(f"-{k}{v}" for k, v in self.settings)
        return f"{self.task}-{self.method}{tail}-s{self.seed}"


@dataclass
class Plan:
    data: Path
    out: Path
    runs: list[Run] = field(default_factory=list)
    max_train_examples: dict[str, int | None] = field(default_factory=dict)
    write_deltas: bool = False
    extra: list[str] = field(default_factory=list)


def parse_grid(specs: Sequence[str], methods: Sequence[str]) -> dict[str, list[tuple[tuple[str, str], ...]]]:
    """`flag=v1,v2` (every method) or `method:flag=v1,v2` → each method's list of grid points."""
    axes: dict[str, list[tuple[str, list[str]]]] = {m: [] for m in methods}
    for spec in specs:
        target, _, assignment = spec.rpartition(":")
        flag, sep, values = assignment.partition("=")
        if not sep or not flag or not values:
            raise ValueError(f"--grid {spec!r}: expected flag=v1,v2 or method:flag=v1,v2")
        for method in ([target] if target else methods):
            if method not in axes:
                raise ValueError(f"--grid {spec!r}: {method!r} is not among --methods")
            axes[method].append((flag.lstrip("-"), values.split(",")))
    points = {}
    for method, method_axes in axes.items():
        if method == YARDSTICK and not any(spec.startswith(f"{YARDSTICK}:") for spec in specs):
            points[method] = [()]
            continue
        names = [flag for flag, _ in method_axes]
        points[method] = [tuple(zip(names, combo, strict=True))
                          for combo in itertools.product(*(values for _, values in method_axes))]
    return points


def command(plan: Plan, run: Run) -> list[str]:
    task = TASKS[run.task]
    cmd = [sys.executable, "-m", "training", "train", "--method", run.method,
           "--train", str(plan.data / task["train"]), "--eval", str(plan.data / task["eval"]),
           "--task-type", task["task_type"], *task["flags"], "--seed", str(run.seed), "--threads", "1",
           "--quiet", "--report", str(plan.out / f"{run.name}.json")]
    limit = plan.max_train_examples.get(run.task)
    if limit:
        cmd += ["--max-train-examples", str(limit)]
    if task["label_names"]:
        cmd += ["--label-names", task["label_names"]]
    if plan.write_deltas and run.method != YARDSTICK:
        cmd += ["--out", str(plan.out / f"{run.name}.safetensors")]
    for flag, value in run.settings:
        cmd += [f"--{flag}", value]
    return cmd + plan.extra


def execute(plan: Plan, jobs: int, nice: int, dry_run: bool) -> list[str]:
    """Run every run whose report is missing, `jobs` at a time; returns the names that failed."""
    plan.out.mkdir(parents=True, exist_ok=True)
    pending = [run for run in plan.runs if not (plan.out / f"{run.name}.json").exists()]
    if dry_run:
        for run in pending:
            print(" ".join(_quote(c) for c in command(plan, run)))
        return []
    running: list[tuple[Run, subprocess.Popen, float]] = []
    failed: list[str] = []
    while pending or running:
        while pending and len(running) < jobs:
            run = pending.pop(0)
            log = open(plan.out / f"{run.name}.log", "w")  # noqa: SIM115 - closed with the process
            prefix = ["nice", "-n", str(nice)] if nice else []
            process = subprocess.Popen(prefix + command(plan, run), stdout=log, stderr=subprocess.STDOUT)
            running.append((run, process, time.time()))
            print(f"started {run.name}", flush=True)
        time.sleep(2)
        for item in list(running):
            run, process, begun = item
            if process.poll() is None:
                continue
            running.remove(item)
            status = "done" if process.returncode == 0 else f"FAILED (exit {process.returncode})"
            if process.returncode != 0:
                failed.append(run.name)
            else:  # tagged now, so that the summary counts it even if this sweep is stopped later
                tag_report(plan, run)
            print(f"{status} {run.name} after {time.time() - begun:.0f} s", flush=True)
    return failed


def _quote(text: str) -> str:
    return f"'{text}'" if any(c in text for c in " #") else text


# --------------------------------------------------------------------------- the summary table


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, sd


def load_reports(folders: Sequence[Path]) -> list[dict]:
    reports = []
    for folder in folders:
        for path in sorted(Path(folder).glob("*.json")):
            report = json.loads(path.read_text())
            if "sweep" in report:
                reports.append(report)
    return reports


def summarise(reports: Sequence[dict], tolerance: dict[str, float] | None = None) -> str:
    """Markdown: per task, method and grid point, the headline metric's mean ± sd over seeds, the gap to
    fine-tuning's mean on the same task, data size and seeds, and the training loop's CPU time and the whole
    run's wall time against fine-tuning's (wall time includes waiting for a shared core; CPU time does not)."""
    tolerance = tolerance or {"pasta": 2.0}
    groups: dict[tuple, list[dict]] = {}
    for rep in reports:
        sweep = rep["sweep"]
        key = (sweep["task"], rep["train_examples"], rep["method"], sweep["point"])
        groups.setdefault(key, []).append(rep)
    lines = ["| task | train rows | method | settings | seeds | headline | mean ± sd | fine-tuning | gap (points) "
             "| target | training CPU × ft | wall × ft | epochs (kept) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = ("finetune", "mask", "pasta", "dsee", "lora")
    for key in sorted(groups, key=lambda k: (k[0], k[1], order.index(k[2]) if k[2] in order else 9, k[3])):
        task, rows, method, point = key
        reps = groups[key]
        headline = TASKS[task]["headline"] if task in TASKS else "accuracy"
        mean, sd = _mean_sd([100 * r[f"eval_{headline}"] for r in reps])
        cpu = _mean_sd([r["train_cpu_seconds"] for r in reps])[0]
        wall = _mean_sd([r["wall_seconds"] for r in reps])[0]
        # Fine-tuning on the same seeds only (each seed draws its own data): the gap is paired.
        seeds = {r["sweep"]["seed"] for r in reps}
        base = [r for r in groups.get((task, rows, YARDSTICK, "defaults"), []) if r["sweep"]["seed"] in seeds]
        ft_cell = gap_cell = target_cell = cpu_cell = wall_cell = "–"
        if base and method != YARDSTICK:
            ft_mean, ft_sd = _mean_sd([100 * r[f"eval_{headline}"] for r in base])
            ft_cpu = _mean_sd([r["train_cpu_seconds"] for r in base])[0]
            ft_wall = _mean_sd([r["wall_seconds"] for r in base])[0]
            gap = mean - ft_mean
            allowed = tolerance.get(method, 1.0)
            ft_cell = f"{ft_mean:.2f} ± {ft_sd:.2f} ({len(base)})"
            gap_cell = f"{gap:+.2f}"
            target_cell = f"{'✓' if gap >= -allowed else '✗'} (≥ −{allowed:.1f})"
            cpu_cell = f"{cpu / ft_cpu:.2f}" if ft_cpu else "–"
            wall_cell = f"{wall / ft_wall:.2f}" if ft_wall else "–"
        epochs = ", ".join(f"{r['epochs']} ({r['best_epoch']})" for r in reps)
        lines.append(f"| {task} | {rows:,} | {method} | {point} | {len(reps)} | {headline} | {mean:.2f} ± {sd:.2f} "
                     f"| {ft_cell} | {gap_cell} | {target_cell} | {cpu_cell} | {wall_cell} | {epochs} |")
    return "\n".join(lines)


def tag_report(plan: Plan, run: Run) -> None:
    """Record in the run's report which sweep run it is (task, grid point), for the summary."""
    path = plan.out / f"{run.name}.json"
    if not path.exists():
        return
    report = json.loads(path.read_text())
    if report.get("sweep", {}).get("name") == run.name:
        return
    report["sweep"] = {"name": run.name, "task": run.task, "seed": run.seed, "point": run.point,
                       "command": command(plan, run)[1:]}
    path.write_text(json.dumps(report, indent=2) + "\n")


def tag_reports(plan: Plan) -> None:
    """Tag every report of the plan that exists (runs finished by an earlier, interrupted sweep too)."""
    for run in plan.runs:
        tag_report(plan, run)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="folder with sst2/, mrpc/, conll2003/")
    parser.add_argument("--tasks", default="sst2", help=f"comma-separated, of {', '.join(TASKS)}")
    parser.add_argument("--methods", default="finetune,mask,pasta,dsee,lora")
    parser.add_argument("--seeds", default="42")
    parser.add_argument("--max-train-examples", action="append", default=[], metavar="[TASK=]N",
                        help="data size (before the validation split), for every task or one task")
    parser.add_argument("--grid", action="append", default=[], metavar="[METHOD:]FLAG=V1,V2")
    parser.add_argument("--out", type=Path, help="folder for the reports (and logs, and deltas with --deltas)")
    parser.add_argument("--deltas", action="store_true", help="also write each run's delta next to its report")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (one thread each)")
    parser.add_argument("--nice", type=int, default=10, help="run the trainings at this niceness")
    parser.add_argument("--dry-run", action="store_true", help="print the commands of the missing runs")
    parser.add_argument("--summary", type=Path, nargs="*", help="only print the table of these folders' reports")
    args, extra = parser.parse_known_args(argv)
    if args.summary:
        print(summarise(load_reports(args.summary)))
        return 0
    if args.data is None or args.out is None:
        parser.error("--data and --out are needed to run a sweep")
    tasks = args.tasks.split(",")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        parser.error(f"unknown task(s) {unknown}; known: {', '.join(TASKS)}")
    methods = args.methods.split(",")
    limits: dict[str, int | None] = {}
    for spec in args.max_train_examples:
        task, _, size = spec.rpartition("=")
        for name in [task] if task else tasks:
            limits[name] = int(size)
    points = parse_grid(args.grid, methods)
    runs = [Run(task, method, int(seed), point) for task in tasks for seed in args.seeds.split(",")
            for method in methods for point in points[method]]
    plan = Plan(args.data, args.out, runs, limits, args.deltas, extra)
    failed = execute(plan, args.jobs, args.nice, args.dry_run)
    if args.dry_run:
        return 0
    tag_reports(plan)
    print(summarise(load_reports([args.out])))
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)} (see their .log)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
