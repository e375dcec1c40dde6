"""Embedding throughput (issue 21): the bare backbone, and embedding tasks mixed with classification tasks,
against the dense backbone on the same sentences.

    python -m bench.embeddings [--rows 64] [--rounds 7] [--threads 1] [--write]

Engine level, in this process, on real SST-2 sentences (`bench/workload.py`), pre-tokenised, in one
padded batch of `--rows` rows per forward. Sides, each timed on the very same rows:

- dense: the plain backbone (no task parts, no head) — the ceiling;
- bare backbone: every row embedded by the bare backbone (mean pooling, L2 normalisation);
- embed + classify (LoRA): half the rows for 8 LoRA embedding tasks (rank 8 on query and value,
  mean pooled, a 256-wide projection on half of them), half for 8 LoRA classification tasks;
- embed + classify (four methods): the same 8 embedding tasks, with 8 classification tasks of
  the four methods of bench/workload.py (mask, PASTA, LoRA, DSEE: keep masks are the costly part);
- sentence-transformers: `SentenceTransformer.encode(..., normalize_embeddings=True)` on the raw
  sentences (its own tokenising included, batch = rows) — what one would run without this server.

Rounds interleave the sides (the order rotates every round); each side's median seconds per
batch is kept, so a noisy neighbour on a shared machine hits every side alike. The bare
backbone's vectors are checked against sentence-transformers' (max |difference| reported).
Nothing asserts on speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from adapters_store.format import DeltaMeta, TaskDelta, TaskHead
from bench.engine import commit, machine
from bench.workload import METHODS, make_method_delta, sentences
from server.backbone import Backbone, packaged_model_path
from server.delta import PreparedDelta, backbone_embedding, prepare
from server.engine import Engine, Row

ROOT = Path(__file__).resolve().parents[1]
TASKS_PER_KIND = 8
PROJECTION = 256


@dataclass
class Result:
    rows: int
    rounds: int
    tokens: int  # real tokens of the batch
    padded: int  # rows × longest
    seconds: dict[str, float] = field(default_factory=dict)  # median seconds per batch, per side
    spread: dict[str, tuple[float, float]] = field(default_factory=dict)  # fastest and slowest round, per side
    st_difference: float | None = None  # bare backbone vs sentence-transformers, max |difference|
    started: str = ""
    took_s: float = 0.0
    uptime: str = ""

    def per_s(self, side: str) -> float:
        return self.rows / self.seconds[side]

    def of_dense(self, side: str) -> float:
        return self.seconds["dense"] / self.seconds[side]


def embedding_delta(backbone: Backbone, method: str, seed: int, projection: int | None) -> TaskDelta:
    """`bench/workload.py`'s delta of `method`, as an embedding task (mean pooled, normalised)."""
    delta = make_method_delta(backbone, method, seed)
    gen = torch.Generator().manual_seed(seed)
    d = backbone.hidden_size
    head = TaskHead(None, None, projection_weight=torch.randn(projection, d, generator=gen) * 0.05 if projection
                    else None, projection_bias=torch.zeros(projection) if projection else None)
    meta = DeltaMeta(method=delta.meta.method, task_type="embedding", labels=(),
                     backbone_fingerprint=backbone.fingerprint)
    return dataclasses.replace(delta, meta=meta, head=head)


def run(rows: int = 64, rounds: int = 7, backbone: Backbone | None = None, anchor: bool = True) -> Result:
    """The sides timed on one batch of `rows` sentences; `anchor=False` leaves sentence-transformers out
    (for a backbone that is not the packaged MiniLM, as in the tests)."""
    started = time.perf_counter()
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = uptime()
    backbone = backbone or Backbone.load()
    engine = Engine(backbone)
    texts = sentences(rows, seed=21)
    encoded = backbone.encode(texts)

    def prepared(delta: TaskDelta, name: str) -> PreparedDelta:
        return prepare(delta, backbone, name, 1)

    embedders = [prepared(embedding_delta(backbone, "lora", 100 + i, PROJECTION if i % 2 else None), f"emb{i}")
                 for i in range(TASKS_PER_KIND)]
    lora_classifiers = [prepared(make_method_delta(backbone, "lora", 200 + i), f"cls{i}")
                        for i in range(TASKS_PER_KIND)]
    mixed_classifiers = [prepared(make_method_delta(backbone, METHODS[i % len(METHODS)], 300 + i), f"mix{i}")
                         for i in range(TASKS_PER_KIND)]
    bare = backbone_embedding(backbone)

    def mixed_rows(classifiers: list[PreparedDelta]) -> list[Row]:
        # Rows alternate embedding and classification, tasks in turn: every task of both kinds in the batch.
        out = []
        for i, text in enumerate(encoded):
            tasks = embedders if i % 2 == 0 else classifiers
            out.append(Row(tasks[(i // 2) % len(tasks)], text))
        return out

    sides: dict[str, Callable[[], object]] = {
        "dense": lambda: engine.forward_dense(encoded),
        "bare backbone": lambda: engine.forward([Row(bare, text) for text in encoded]),
        "embed + classify (LoRA)": lambda: engine.forward(mixed_rows(lora_classifiers)),
        "embed + classify (four methods)": lambda: engine.forward(mixed_rows(mixed_classifiers)),
    }
    difference = None
    if anchor:
        from sentence_transformers import SentenceTransformer

        st_model = SentenceTransformer(packaged_model_path(), device="cpu")

        def st_encode() -> torch.Tensor:
            return st_model.encode(texts, batch_size=rows, normalize_embeddings=True, convert_to_tensor=True)

        sides["sentence-transformers"] = st_encode
        ours = torch.stack(engine.forward([Row(bare, text) for text in encoded]))
        difference = float((ours - st_encode().float().cpu()).abs().max())
    for fn in sides.values():  # warm up every side once
        fn()
    samples: dict[str, list[float]] = {side: [] for side in sides}
    names = list(sides)
    for r in range(rounds):
        for side in names[r % len(names):] + names[:r % len(names)]:
            began = time.perf_counter()
            with torch.inference_mode():
                sides[side]()
            samples[side].append(time.perf_counter() - began)
    longest = max(len(e.input_ids) for e in encoded)
    return Result(rows=rows, rounds=rounds, tokens=sum(len(e.input_ids) for e in encoded), padded=rows * longest,
                  seconds={side: statistics.median(values) for side, values in samples.items()},
                  spread={side: (min(values), max(values)) for side, values in samples.items()},
                  st_difference=difference, started=now, took_s=time.perf_counter() - started, uptime=load)


def uptime() -> str:
    """The machine's load when the run starts (`uptime`), recorded with the figures."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def section(result: Result) -> str:
    lines = [
        f"### Embeddings (`python -m bench.embeddings`) — {result.started}, commit {commit()}",
        "",
        f"Machine: {machine()}; a shared 2-core machine (other engineers' tests and jobs running); `uptime` as "
        f"the run began: `{result.uptime}`. {result.rows} real SST-2 sentences "
        f"in one batch ({result.tokens} tokens, {result.padded} padded), {result.rounds} interleaved rounds, "
        f"medians; took {result.took_s:.0f} s. Embedding tasks: {TASKS_PER_KIND} LoRA (rank 8, query and "
        f"value), mean pooled and normalised, half with a {PROJECTION}-wide projection; classification tasks: "
        f"{TASKS_PER_KIND} LoRA, or {TASKS_PER_KIND} of the four methods (mask, PASTA, LoRA, DSEE); rows "
        "alternate embedding and classification.",
        "",
        "| side | ms / batch (median) | fastest – slowest round, ms | sentences/s | × dense |",
        "|---|---|---|---|---|",
    ]
    for side, seconds in result.seconds.items():
        fastest, slowest = result.spread.get(side, (seconds, seconds))
        lines.append(f"| {side} | {seconds * 1000:.0f} | {fastest * 1000:.0f} – {slowest * 1000:.0f} "
                     f"| {result.per_s(side):.0f} | {result.of_dense(side):.2f}× |")
    if result.st_difference is not None:
        lines += ["", f"The bare backbone's vectors against sentence-transformers' own: max |difference| "
                      f"{result.st_difference:.1e}. (sentence-transformers' figure includes its own tokenising; "
                      "the engine's sides run on pre-tokenised rows.)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.embeddings", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write", action="store_true", help="append the section to BENCHMARKS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    text = section(run(args.rows, args.rounds))
    print(text)
    if args.write:
        path = ROOT / "BENCHMARKS.md"
        path.write_text(path.read_text().rstrip() + "\n\n" + text + "\n")
        print(f"appended to {path}")


if __name__ == "__main__":
    main()
