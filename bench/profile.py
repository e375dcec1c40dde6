"""Where a served run's time goes: py-spy samples of the server, summed per thread and per kind of work.

`python -m bench.served --profile FILE` records the server with `py-spy record --threads
--format raw` (no `--idle`: a sample is a thread on the CPU, or about to be — a thread waiting on
the GIL or a queue is not sampled). Each thread's share = its samples ÷ (rate × seconds): the
fraction of one core it used. Within a thread, a sample is put under the first kind of work
(in `KINDS` order) any of its frames belongs to.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

# (kind, pattern on one frame "function (file:line)"), first match wins, so the specific come first.
KINDS: list[tuple[str, re.Pattern[str]]] = [
    ("keep mask (W ⊙ K, per-task GEMMs)", re.compile(r"parts/keep_mask\.py|zeroed|materialise_into")),
    ("low rank + sparse corrections", re.compile(r"parts/(low_rank|sparse)\.py|_add_corrections")),
    ("PASTA", re.compile(r"parts/pasta\.py|add_before_layer")),
    ("collate, pad, plan", re.compile(r"_collate|_plan \(|pad_batch|special_slots")),
    ("task heads", re.compile(r"classify_(tokens|sequences)|parts/task_head\.py")),
    ("backbone forward (shared GEMMs, attention)", re.compile(r"_run_backbone|forward_dense")),
    ("resolve, pin, load deltas", re.compile(r"_resolve|prepare_delta|cache\.py")),
    ("post-processing (softmax, words)", re.compile(r"predict_row|postprocess\.py")),
    ("tokenisation", re.compile(r"\bencode \(|tokenization_utils|tokenizers")),
    ("JSON (parse + render)", re.compile(r"json|render \(|jsonable_encoder|orjson")),
    ("request validation (pydantic)", re.compile(r"pydantic|_shape \(|validate")),
    ("batch formation", re.compile(r"form_batch|_take_batch|_gather")),
    ("HTTP (uvicorn, starlette, h11)", re.compile(r"uvicorn|starlette|h11|httptools|fastapi")),
    ("event loop (asyncio)", re.compile(r"asyncio")),
]


def summarise(path: Path, seconds: float, rate: int) -> list[tuple[str, float, list[tuple[str, float]]]]:
    """[(thread, share of one core, [(kind, share of one core), ...]), ...], busiest thread first."""
    threads: Counter[str] = Counter()
    kinds: dict[str, Counter[str]] = {}
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        thread = re.sub(r"^thread \(\w+\): ", "", frames[0])
        thread = re.sub(r"_\d+$", "", thread)  # pool threads: deltaserve-engine_0 -> deltaserve-engine
        n = int(count)
        threads[thread] += n
        kind = next((k for k, pattern in KINDS if any(pattern.search(f) for f in frames[1:])), "other")
        kinds.setdefault(thread, Counter())[kind] += n
    total = rate * seconds
    return [(thread, n / total, [(k, c / total) for k, c in kinds[thread].most_common()])
            for thread, n in threads.most_common()]


def table(summary: list[tuple[str, float, list[tuple[str, float]]]], top: int = 6) -> str:
    lines = ["| server thread | CPU (share of one core) | what it did (share of one core) |", "|---|---|---|"]
    for thread, share, kinds in summary:
        if share < 0.01:
            continue
        what = ", ".join(f"{k} {s:.0%}" for k, s in kinds[:top] if s >= 0.005)
        lines.append(f"| {thread} | {share:.0%} | {what} |")
    return "\n".join(lines)
