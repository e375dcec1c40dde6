"""Render training reports (`--report` JSON files) as the Markdown table of RESULTS.md.

    python -m training.results runs/*.json
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

ORDER = ("finetune", "mask", "pasta", "dsee", "lora")
# The metric each data set is judged on (issue 13's targets); others: accuracy, F1 for token tasks.
HEADLINE = {"sst2": "accuracy", "mrpc": "f1", "conll": "f1"}
# How far below fine-tuning a method may land on the headline metric, in points.
TOLERANCE = {"pasta": 2.0}
DEFAULT_TOLERANCE = 1.0
MAX_WALL_RATIO = 2.0


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def table(reports: Sequence[dict]) -> str:
    """One row per report. `val` is the validation score that chose the epoch; the evaluation columns
    are measured once, on the restored best epoch."""
    lines = ["| task | method | accuracy | F1 | MCC | val (selects) | trainable params | delta bytes | train s "
             "| epochs (best) | steps | train / val examples |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for rep in sorted(reports, key=lambda r: (r["task"], ORDER.index(r["method"]))):
        size = f"{rep['delta_bytes']:,}" if rep.get("delta_bytes") else "– (no delta)"
        val = rep.get("val_f1") if "token" in rep["settings"]["task_type"] else rep.get("val_accuracy")
        cells = [rep["task"], rep["method"], _pct(rep.get("eval_accuracy")), _pct(rep.get("eval_f1")),
                 _pct(rep.get("eval_mcc")), _pct(val), f"{rep['trainable_params']:,}", size,
                 f"{rep['train_seconds']:.0f}", f"{rep['epochs']} ({rep['best_epoch']})", f"{rep.get('steps', '–')}",
                 f"{rep['train_examples']:,} / {rep.get('val_examples', 0):,}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _wall(rep: dict) -> float:
    """The whole run (setup, training, evaluation) where the report has it, else the training loop."""
    return rep.get("wall_seconds") or rep["train_seconds"]


def headline(rep: dict) -> str:
    token = "token" in rep["settings"]["task_type"]
    return HEADLINE.get(rep["task"].split("-")[0], "f1" if token else "accuracy")


def against_finetuning(reports: Sequence[dict]) -> str:
    """Each method's gap to `--method finetune` on the same task (headline metric, points) and its wall
    and CPU time as a multiple of fine-tuning's, checked against the targets."""
    tuned = {rep["task"]: rep for rep in reports if rep["method"] == "finetune"}
    lines = ["| task | metric | method | score | fine-tuning | gap (points) | target | wall × fine-tuning "
             "| CPU × fine-tuning |", "|---|---|---|---|---|---|---|---|---|"]
    for rep in sorted(reports, key=lambda r: (r["task"], ORDER.index(r["method"]))):
        base = tuned.get(rep["task"])
        if rep["method"] == "finetune" or base is None:
            continue
        metric = headline(rep)
        score, reference = 100 * rep[f"eval_{metric}"], 100 * base[f"eval_{metric}"]
        tolerance = TOLERANCE.get(rep["method"], DEFAULT_TOLERANCE)
        wall = _wall(rep) / _wall(base)
        cpu = rep["train_cpu_seconds"] / base["train_cpu_seconds"]
        ok = "✓" if score - reference >= -tolerance else "✗"
        lines.append(f"| {rep['task']} | {metric} | {rep['method']} | {score:.2f} | {reference:.2f} | "
                     f"{score - reference:+.2f} | {ok} (≥ −{tolerance:.1f}) | {wall:.2f} "
                     f"{'✓' if wall <= MAX_WALL_RATIO else '✗'} | {cpu:.2f} |")
    return "\n".join(lines)


def command(rep: dict) -> str:
    """The `deltaserve train` command line that produced a report (flags that differ from defaults)."""
    s = rep["settings"]
    parts = ["deltaserve train", f"--method {s['method']}", f"--train {s['train']}", f"--eval {s['eval']}",
             f"--task-type {s['task_type']}"]
    for flag, key in (("--text-column", "text_column"), ("--text-pair-column", "text_pair_column"),
                      ("--label-column", "label_column")):
        if s.get(key) is not None:
            parts.append(f"{flag} '{s[key]}'")
    for flag, key in (("--max-train-examples", "max_train_examples"),
                      ("--epochs", "epochs"), ("--lr", "lr"), ("--head-lr", "head_lr"), ("--threads", "threads"),
                      ("--val", "val"), ("--out", "out")):
        if s.get(key) is not None:
            parts.append(f"{flag} {s[key]}")
    for flag, key, default in (("--batch-size", "batch_size", 32), ("--max-length", "max_length", 128),
                               ("--seed", "seed", 42)):
        if s.get(key) not in (None, default):
            parts.append(f"{flag} {s[key]}")
    if s.get("label_names"):
        parts.append(f"--label-names {','.join(s['label_names'])}")
    if s.get("head_pooler"):
        parts.append("--head-pooler")
    if s.get("report"):
        parts.append(f"--report {s['report']}")
    return " ".join(parts)


def main(paths: Sequence[str]) -> None:
    reports = []
    for path in paths:
        rep = json.loads(Path(path).read_text())
        rep["task"] = Path(path).stem.rsplit("-", 1)[0]
        reports.append(rep)
    print(table(reports))
    print()
    print(against_finetuning(reports))
    print()
    for rep in sorted(reports, key=lambda r: (r["task"], ORDER.index(r["method"]))):
        print(f"- {rep['task']} {rep['method']}: `{command(rep)}`")


if __name__ == "__main__":
    main(sys.argv[1:])
