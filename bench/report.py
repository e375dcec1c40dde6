"""Turning a run's results into a BENCHMARKS.md section (summary table first) and PNG plots.

A section is appended, never replacing older ones, so BENCHMARKS.md keeps the history; plots
are rewritten under bench/plots/ (quick runs under bench/plots/quick/) and git keeps theirs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.http import HttpLevel
from bench.memory import MethodSize, copies_bytes, serving_bytes
from bench.suite import ColdLoad, Point

ROOT = Path(__file__).resolve().parents[1]
SIDES = {"dense": "dense ceiling", "copies": "per-task copies", "swap": "naive swap", "peft": "PEFT mixed"}


@dataclass
class Run:
    mode: str
    machine: str
    date: str
    commit: str
    threads: int
    repeats: int
    seconds: float = 0.0
    points: list[Point] = field(default_factory=list)
    cold: list[ColdLoad] = field(default_factory=list)
    sizes: list[MethodSize] = field(default_factory=list)
    backbone_bytes: int = 0
    rss: dict[str, float] = field(default_factory=dict)
    http: list[HttpLevel] = field(default_factory=list)
    agreement: dict[str, float] = field(default_factory=dict)
    peft_hidden: float | None = None
    notes: list[str] = field(default_factory=list)
    extra_sections: list[str] = field(default_factory=list)  # already Markdown (e.g. bench.served's)


def _met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def summary(run: Run) -> list[str]:
    lines = ["| target | measured | met |", "|---|---|---|"]
    at16 = [p for p in run.points if p.tasks == 16]
    for tokens in sorted({p.tokens for p in at16}):
        pts = [p for p in at16 if p.tokens == tokens]
        worst = min(pts, key=lambda p: p.ratio("dense"))
        values = ", ".join(f"{p.method} {p.ratio('dense'):.2f}×" for p in pts)
        lines.append(f"| 16 tasks/batch ≥ 0.90× dense, every method + mix ({tokens} tokens) | {values} "
                     f"| {_met(worst.ratio('dense') >= 0.90)} |")
        for side, target in (("swap", 3.0), ("peft", 1.5)):
            have = [p for p in pts if side in p.seconds]
            if have:
                values = ", ".join(f"{p.method} {p.ratio(side):.2f}×" for p in have)
                lines.append(f"| 16 tasks/batch ≥ {target:g}× {SIDES[side]} ({tokens} tokens) | {values} "
                             f"| {_met(min(p.ratio(side) for p in have) >= target)} |")
    top = [h for h in run.http if h.clients == 64]
    if top:
        h = top[0]
        lines.append(f"| HTTP, 64 clients ≥ 0.80× engine offline | {h.ratio:.2f}× "
                     f"({h.seq_per_s:.1f} vs {h.offline_seq_per_s:.1f} seq/s) | {_met(h.ratio >= 0.8)} |")
    if run.cold:
        values = ", ".join(f"{c.method} {c.total_ms:.1f} ms" for c in run.cold)
        lines.append(f"| cold load ≤ 20 ms (file → first answer) | {values} "
                     f"| {_met(max(c.total_ms for c in run.cold) <= 20)} |")
    return lines


def engine_table(points: Sequence[Point]) -> list[str]:
    lines = ["| tokens | k (batch) | method | engine seq/s | engine ms/batch | × dense | × copies | × swap | × PEFT |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        cells = [f"{p.ratio('dense'):.2f}"] + [
            f"{p.ratio(side):.2f}" if side in p.seconds else "–" for side in ("copies", "swap", "peft")]
        k = f"{p.tasks} ({p.batch}, {p.distinct} distinct)"
        if "copies" in p.seconds and p.copies_built < p.distinct:
            cells[1] += f" ({p.copies_built} real copies)"
        lines.append(f"| {p.tokens} | {k} | {p.method} | {p.seq_per_s('engine'):.1f} | "
                     f"{p.seconds['engine'] * 1e3:.0f} | " + " | ".join(cells) + " |")
    return lines


def memory_table(run: Run) -> list[str]:
    b = run.backbone_bytes
    lines = ["| method | file bytes | resident bytes (nbytes) | RSS growth / task | 1 task | 100 tasks | 1000 tasks "
             "| 1000 full copies |", "|---|---|---|---|---|---|---|---|"]
    for m in run.sizes:
        rss = run.rss.get(m.method)
        mib = [f"{serving_bytes(b, m.resident_bytes, n) / 2**20:,.0f} MiB" for n in (1, 100, 1000)]
        lines.append(f"| {m.method} | {m.file_bytes:,} | {m.resident_bytes:,} | "
                     f"{f'{rss:,.0f}' if rss is not None else '–'} | " + " | ".join(mib)
                     + f" | {copies_bytes(b, m.head_bytes, 1000) / 2**20:,.0f} MiB |")
    if "full-copy" in run.rss:
        lines.append(f"\nOne full copy of the model: {b:,} parameter bytes; measured RSS growth per deep copy "
                     f"{run.rss['full-copy']:,.0f} bytes.")
    return lines


def plot_throughput(path: Path, points: Sequence[Point]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({p.tokens for p in points})
    fig, axes = plt.subplots(1, len(lengths), figsize=(5.5 * len(lengths), 4.2), squeeze=False)
    for ax, tokens in zip(axes[0], lengths, strict=True):
        pts = [p for p in points if p.tokens == tokens]
        for method in dict.fromkeys(p.method for p in pts):
            mp = sorted((p for p in pts if p.method == method), key=lambda p: p.tasks)
            ax.plot([p.tasks for p in mp], [p.ratio("dense") for p in mp], marker="o", label=method)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(0.9, color="k", ls=":", lw=0.8, label="target 0.90×")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("distinct tasks per batch (k)")
        ax.set_ylabel("engine throughput / dense backbone")
        ax.set_title(f"{tokens} tokens")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_baselines(path: Path, points: Sequence[Point], tasks: int = 16) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [p for p in points if p.tasks == tasks]
    labels = [f"{p.method}\n{p.tokens} tok" for p in pts]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(pts) + 2), 4.2))
    width = 0.8 / len(SIDES)
    for j, side in enumerate(SIDES):
        xs = [i + (j - 1.5) * width for i in range(len(pts))]
        ax.bar(xs, [p.seq_per_s(side) if side in p.seconds else 0 for p in pts], width, label=SIDES[side])
    ax.scatter(range(len(pts)), [p.seq_per_s("engine") for p in pts], color="k", zorder=3, label="engine (mixed)")
    ax.set_xticks(range(len(pts)), labels, fontsize=8)
    ax.set_ylabel("sequences / s")
    ax.set_title(f"{tasks} distinct tasks per batch: engine vs baselines")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def section(run: Run, plots: dict[str, Path]) -> str:
    rel = {k: p.relative_to(ROOT).as_posix() for k, p in plots.items()}
    out = [f"## `python -m bench{' --quick' if run.mode == 'quick' else ''}` — {run.date}, commit {run.commit}", "",
           f"Machine: {run.machine}; torch threads {run.threads}. Took {run.seconds:.0f} s. Each figure is a ratio "
           f"against a baseline measured in the same run: per point, every side runs in interleaved rounds "
           f"(order rotating), {run.repeats} rounds, medians.", "", "### Summary", ""]
    out += summary(run)
    out += ["", *[f"- {n}" for n in run.notes], ""]
    if run.points:
        out += ["### Engine throughput", "",
                "× dense = engine throughput / dense backbone (the ceiling; ≤ 1). × copies / swap / PEFT = engine "
                "throughput / that baseline's (> 1: the engine is faster). k = 64 runs at batch 64 so 64 tasks are "
                "really distinct; other points batch 32 (k = 1: one task for all rows).", ""]
        out += engine_table(run.points)
        out += ["", f"![throughput vs dense]({rel['throughput']})",
                f"![baselines]({rel['baselines']})", ""]
    if run.agreement:
        worst = ", ".join(f"{k} {v:.1e}" for k, v in run.agreement.items())
        out += [f"Correctness (same rows, max |logit difference| to the engine, must be ≤ 1e-4): {worst}."]
        if run.peft_hidden is not None:
            out += [f"PEFT's last hidden states vs the engine's on the same LoRA rows: max difference "
                    f"{run.peft_hidden:.1e}."]
        out += [""]
    if run.sizes:
        out += ["### Memory", "", "Resident = backbone parameter bytes + n × per-task resident bytes "
                "(`PreparedDelta.nbytes`); full copies = n × (backbone + head). RSS growth: one fresh process per "
                "method prepares the same file 100 times and reads VmRSS before/after.", ""]
        out += memory_table(run)
        out += ["", f"![memory]({rel['memory']})", ""]
    if run.cold:
        out += ["### Cold load (delta file on disk → first answer)", "",
                "| method | file bytes | total ms | read ms | prepare_delta ms | first forward (1 row) ms |",
                "|---|---|---|---|---|---|"]
        out += [f"| {c.method} | {c.file_bytes:,} | **{c.total_ms:.1f}** | {c.read_ms:.2f} | {c.prepare_ms:.1f} | "
                f"{c.forward_ms:.1f} |" for c in run.cold]
        out += ["", f"Median of {run.cold[0].trials} trials after one warm-up; the file is in the page cache.", ""]
    if run.http:
        out += ["### HTTP (uvicorn subprocess on 127.0.0.1, 16 tasks, one input per request)", "",
                "| clients | requests | errors | seq/s | p50 ms | p99 ms | engine offline seq/s | ratio |",
                "|---|---|---|---|---|---|---|---|"]
        out += [f"| {h.clients} | {h.requests} | {h.errors} | {h.seq_per_s:.1f} | {h.p50_ms:.0f} | {h.p99_ms:.0f} | "
                f"{h.offline_seq_per_s:.1f} | {h.ratio:.2f}× |" for h in run.http]
        out += [""]
    for extra in run.extra_sections:
        out += [extra, ""]
    return "\n".join(out)


def write(run: Run, plots: dict[str, Path]) -> Path:
    path = ROOT / "BENCHMARKS.md"
    existing = path.read_text() if path.exists() else "# Benchmarks\n\nNewest runs at the bottom.\n"
    path.write_text(existing.rstrip() + "\n\n" + section(run, plots) + "\n")
    return path


