"""Engine throughput against the baselines, and cold load: the measuring half of `python -m bench`.

`Workbench` holds one backbone, the engine on it, a pristine copy of the model for the
baselines, and per method the prepared deltas (16 distinct random deltas per method; a point
with more tasks than that prepares the same bytes again under new names, so every task is its
own `PreparedDelta` with its own tensors). `mix` takes the four methods in turn.

A point (method, text length, k tasks) times the engine's mixed batch and each baseline on the
same rows in interleaved rounds (the order rotates every round) and keeps each side's median,
so a noisy neighbour on a shared machine hits every side alike. Figures are ratios to the
dense ceiling and to the baselines measured in the same rounds.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.baselines import NaiveSwapper, PeftMixed, TaskCopies, max_difference, plain_copy
from bench.workload import METHODS, make_method_delta, texts_of_exact_length
from server.backbone import Backbone
from server.delta import PreparedDelta, prepare_delta
from server.engine import Engine, Row

DISTINCT = 16  # distinct random deltas generated per method
AGREE = 1e-4  # baselines must give the engine's logits within this


@dataclass
class Point:
    method: str
    tokens: int
    tasks: int  # k asked for
    batch: int
    distinct: int  # distinct tasks actually in the batch
    seconds: dict[str, float] = field(default_factory=dict)  # median seconds per batch, per side
    samples: dict[str, list[float]] = field(default_factory=dict)
    copies_built: int = 0

    def seq_per_s(self, side: str) -> float:
        return self.batch / self.seconds[side]

    def ratio(self, side: str) -> float:
        """Engine throughput / side's throughput (for `dense`: how close to the ceiling)."""
        return self.seconds[side] / self.seconds["engine"]


@dataclass
class ColdLoad:
    method: str
    file_bytes: int
    total_ms: float
    read_ms: float
    prepare_ms: float
    forward_ms: float
    trials: int


class Workbench:
    def __init__(self, backbone: Backbone | None = None, distinct: int = DISTINCT) -> None:
        self.backbone = backbone or Backbone.load()
        self.pristine = plain_copy(self.backbone.model)  # before the engine swaps its modules
        self.engine = Engine(self.backbone)
        self.swapper = NaiveSwapper(self.backbone, self.pristine)
        self.distinct = distinct
        self._bytes: dict[str, list[bytes]] = {}
        self._prepared: dict[tuple[str, int], PreparedDelta] = {}
        self._copies: dict[tuple[str, int], TaskCopies] = {}
        self._peft: dict[int, PeftMixed] = {}
        self.agreement: dict[str, float] = {}  # "method/side" -> max |logit difference| vs the engine

    # ------------------------------------------------------------------ deltas

    def delta_bytes(self, method: str) -> list[bytes]:
        if method not in self._bytes:
            self._bytes[method] = [make_method_delta(self.backbone, method, seed).to_bytes()
                                   for seed in range(self.distinct)]
        return self._bytes[method]

    def _source(self, method: str, index: int) -> tuple[str, int]:
        """Which (plain method, task index) task `index` of `method` is (mix: the four in turn)."""
        if method == "mix":
            return METHODS[index % len(METHODS)], index // len(METHODS)
        return method, index

    def task(self, method: str, index: int) -> PreparedDelta:
        key = self._source(method, index)
        if key not in self._prepared:
            plain, i = key
            data = self.delta_bytes(plain)[i % self.distinct]
            # keep_source: the baselines build their dense weights from the parsed delta
            self._prepared[key] = prepare_delta(data, self.backbone, f"{plain}-{i}", 1, keep_source=True)
        return self._prepared[key]

    def copies_for(self, method: str, tasks: int, cap: int) -> tuple[TaskCopies, int]:
        """Per-task model copies for tasks 0..k-1 and how many are real; beyond `cap` per method the
        tasks reuse the copies in turn (same cost per forward, wrong logits: never checked)."""
        runner = TaskCopies(self.backbone, self.pristine, [])
        real = 0
        for i in range(tasks):
            plain, j = self._source(method, i)
            key = (plain, j if j < cap else j % cap)
            real += int(j < cap)
            if key not in self._copies:
                self._copies[key] = TaskCopies(self.backbone, self.pristine, [self.task(*key)])
            runner.models[id(self.task(method, i))] = self._copies[key].models[id(self.task(*key))]
        return runner, real

    # ------------------------------------------------------------------ engine throughput

    def point(self, method: str, tokens: int, tasks: int, sides: Sequence[str], repeats: int,
              batch: int = 32, copies_cap: int = DISTINCT, check: bool = False) -> Point:
        batch = max(batch, tasks)  # k = 64 runs at batch 64 so that 64 tasks are really distinct
        texts = texts_of_exact_length(self.backbone, batch, tokens, seed=tasks)
        deltas = [self.task(method, i % tasks) for i in range(batch)]
        rows = [Row(d, t) for d, t in zip(deltas, texts, strict=True)]
        pairs = [(d, t) for d, t in zip(deltas, texts, strict=True)]
        point = Point(method, tokens, tasks, batch, len({id(d) for d in deltas}))
        fns: dict[str, Callable[[], object]] = {
            "engine": lambda: self.engine.forward(rows),
            "dense": lambda: self.engine.forward_dense(texts),
        }
        if "swap" in sides:
            fns["swap"] = lambda: self.swapper.forward(pairs)
        if "copies" in sides:
            copy_runner, point.copies_built = self.copies_for(method, min(tasks, batch), copies_cap)
            fns["copies"] = lambda: copy_runner.forward(pairs)
        if "peft" in sides and method == "lora":
            peft = self.peft_for(tasks)
            fns["peft"] = lambda: peft.forward(pairs)
        if check:
            self._check(method, fns, point.copies_built >= point.distinct)
        names = list(fns)
        samples: dict[str, list[float]] = {name: [] for name in names}
        for round_ in range(repeats):
            for name in names[round_ % len(names):] + names[: round_ % len(names)]:
                started = time.perf_counter()
                fns[name]()
                samples[name].append(time.perf_counter() - started)
        point.samples = samples
        point.seconds = {name: statistics.median(s) for name, s in samples.items()}
        return point

    def peft_for(self, tasks: int) -> PeftMixed:
        if tasks not in self._peft:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._peft[tasks] = PeftMixed(self.backbone, self.pristine,
                                              [self.task("lora", i) for i in range(tasks)])
        return self._peft[tasks]

    def _check(self, method: str, fns: dict[str, Callable[[], object]], copies_exact: bool) -> None:
        """One call of every side (also the warm-up): baselines must give the engine's logits."""
        reference = fns["engine"]()
        fns["dense"]()
        for side in ("copies", "swap", "peft"):
            if side not in fns or (side == "copies" and not copies_exact):
                continue
            difference = max_difference(reference, fns[side]())  # type: ignore[arg-type]
            self.agreement[f"{method}/{side}"] = difference
            if difference > AGREE:
                raise AssertionError(f"{method}: {side} differs from the engine by {difference:.2e}")

    def peft_hidden_difference(self, tasks: int = 4, rows: int = 8, tokens: int = 32) -> float:
        """Max |last hidden state| difference, PEFT's mixed batch vs the engine, on the same rows."""
        texts = texts_of_exact_length(self.backbone, rows, tokens, seed=99)
        deltas = sorted((self.task("lora", i % tasks) for i in range(rows)), key=lambda d: d.name)
        captured: list[torch.Tensor] = []
        handle = self.backbone.model.register_forward_hook(
            lambda module, args, out: captured.append(out.last_hidden_state.clone()))
        try:
            # rows already grouped by task, none with a keep mask: the engine keeps their order
            self.engine.forward([Row(d, t) for d, t in zip(deltas, texts, strict=True)])
        finally:
            handle.remove()
        peft_hidden = self.peft_for(tasks).hidden(list(zip(deltas, texts, strict=True))).last_hidden_state
        return float((captured[0] - peft_hidden).abs().max())

    # ------------------------------------------------------------------ cold load

    def cold_load(self, method: str, trials: int) -> ColdLoad:
        """A delta file on disk -> first answer: read + prepare_delta + one forward of one row."""
        data = self.delta_bytes(method)[0]
        text = texts_of_exact_length(self.backbone, 1, 32, seed=7)[0]
        reads, prepares, forwards, totals = [], [], [], []
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / f"{method}.safetensors"
            path.write_bytes(data)
            for trial in range(trials + 1):
                t0 = time.perf_counter()
                raw = path.read_bytes()
                t1 = time.perf_counter()
                prepared = prepare_delta(raw, self.backbone, f"cold-{method}-{trial}", 1)
                t2 = time.perf_counter()
                self.engine.forward([Row(prepared, text)])
                t3 = time.perf_counter()
                if trial == 0:
                    continue  # first trial warms the code paths, not the delta
                reads.append(t1 - t0)
                prepares.append(t2 - t1)
                forwards.append(t3 - t2)
                totals.append(t3 - t0)
        ms = lambda xs: statistics.median(xs) * 1e3  # noqa: E731
        return ColdLoad(method, len(data), ms(totals), ms(reads), ms(prepares), ms(forwards), trials)
