"""The benchmark suite's functions on a tiny model: structure, sanity and the baselines' correctness.

Per-task copies, naive swapping and PEFT's mixed batch must give the engine's logits (≤ 1e-4)
on the same rows, or the speed comparisons would compare different computations. Nothing here
asserts on speed.
"""

from __future__ import annotations

import pytest
import torch

from bench import memory, report
from bench.baselines import NaiveSwapper, TaskCopies, max_difference
from bench.suite import Workbench
from bench.workload import METHODS, texts_of_exact_length
from server.engine import Row
from tests.conftest import make_tiny_backbone


@pytest.fixture(scope="module")
def bench(tokenizer) -> Workbench:
    return Workbench(make_tiny_backbone(tokenizer), distinct=4)


@pytest.mark.parametrize("method", [*METHODS, "mix"])
def test_baselines_give_the_engines_logits(bench: Workbench, method: str) -> None:
    texts = texts_of_exact_length(bench.backbone, 6, 24)
    deltas = [bench.task(method, i % 4) for i in range(6)]
    reference = bench.engine.forward([Row(d, t) for d, t in zip(deltas, texts, strict=True)])
    pairs = list(zip(deltas, texts, strict=True))
    dense = bench.engine.forward_dense(texts)
    assert dense.shape[0] == 6
    assert max_difference(reference, TaskCopies(bench.backbone, bench.pristine, deltas).forward(pairs)) <= 1e-4
    assert max_difference(reference, bench.swapper.forward(pairs)) <= 1e-4
    if method == "lora":
        assert max_difference(reference, bench.peft_for(4).forward(pairs)) <= 1e-4


def test_naive_swap_reverts_the_shared_weights(bench: Workbench) -> None:
    swapper = NaiveSwapper(bench.backbone, bench.pristine)
    before = {k: v.clone() for k, v in swapper.model.state_dict().items()}
    texts = texts_of_exact_length(bench.backbone, 2, 16)
    swapper.forward([(bench.task("dsee", 0), texts[0]), (bench.task("mask", 1), texts[1])])
    after = swapper.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_deltas_change_the_answer(bench: Workbench) -> None:
    text = texts_of_exact_length(bench.backbone, 1, 16)[0]
    for method in METHODS:
        a, b = bench.engine.forward([Row(bench.task(method, 0), text), Row(bench.task(method, 1), text)])
        assert not torch.allclose(a, b)  # distinct tasks answer differently: the comparison is not vacuous


def test_points_cold_load_and_report(bench: Workbench, tmp_path) -> None:
    points = [bench.point("lora", 16, k, ("dense", "copies", "swap", "peft"), repeats=1, batch=8, check=True)
              for k in (1, 4)]
    points.append(bench.point("mix", 16, 16, ("dense", "swap"), repeats=1, batch=8, check=True))
    assert points[-1].batch == 16 and points[-1].distinct == 16  # k > batch runs at batch k
    for p in points:
        assert set(p.seconds) >= {"engine", "dense", "swap"}
        assert all(s > 0 for s in p.seconds.values())
        assert p.seq_per_s("engine") > 0 and p.ratio("dense") > 0
    assert bench.agreement and max(bench.agreement.values()) <= 1e-4
    assert bench.peft_hidden_difference(tasks=2, rows=4, tokens=12) <= 1e-4

    cold = bench.cold_load("mask", trials=2)
    assert cold.total_ms >= cold.prepare_ms > 0 and cold.file_bytes > 0

    sizes = memory.sizes({m: bench.delta_bytes(m)[0] for m in METHODS},
                         {m: bench.task(m, 0).nbytes for m in METHODS},
                         {m: bench.task(m, 0).head.nbytes for m in METHODS})
    backbone_bytes = bench.backbone.parameter_bytes
    for size in sizes:
        assert 0 < size.resident_bytes < backbone_bytes
        assert memory.serving_bytes(backbone_bytes, size.resident_bytes, 1000) < memory.copies_bytes(
            backbone_bytes, size.head_bytes, 1000)

    run = report.Run("quick", "test machine", "today", "abc1234", 1, 1, points=points, cold=[cold], sizes=sizes,
                     backbone_bytes=backbone_bytes, agreement=bench.agreement)
    plots = {name: report.ROOT / "bench" / "plots" / "test" / f"{name}.png"
             for name in ("throughput", "baselines", "memory")}
    for name, plot in (("throughput", report.plot_throughput), ("baselines", report.plot_baselines)):
        path = tmp_path / f"{name}.png"
        plot(path, points)
        assert path.stat().st_size > 0
    memory.plot(tmp_path / "memory.png", backbone_bytes, sizes)
    assert (tmp_path / "memory.png").stat().st_size > 0
    text = report.section(run, plots)
    assert "### Summary" in text and "| target | measured | met |" in text
    assert "cold load ≤ 20 ms" in text and "lora" in text
