"""The Triton backend's engine against the independent reference: every part, mixed batches.

CI has no GPU: the kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set
by `server.backends.triton_ops` when no GPU is present) on tiny models, which checks exactly
what they compute, not how fast. Tests marked `cuda` repeat the parity on a real GPU in fp32
and in half precision; they are skipped where there is none.
"""

from __future__ import annotations

import copy
import os
import random

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from server.backbone import Backbone
from server.delta import prepare
from server.engine import Engine, Row
from tests.conftest import make_tiny_model
from tests.factories import ALL_PARTS, make_delta
from tests.reference import ReferenceTask

TEXTS = [
    "a gripping, funny film",
    "dull",
    ("The cat sat.", "A cat sat."),
    "John Smith flew to Paris.",
]

# fp32 kernels accumulate in another order than BLAS: a few ulps over the tiny model's sums.
FP32_TOLERANCE = 1e-4
# Half precision against the fp32 reference (docs/gpu.md states the same bounds).
HALF_TOLERANCE = {torch.float16: 5e-2, torch.bfloat16: 2e-1}


def _tasks(backbone: Backbone):
    return [
        make_delta(backbone, ("keep",), seed=1, method="mask", zero_fraction=0.05),
        make_delta(backbone, ("pasta",), seed=2, method="pasta"),
        make_delta(backbone, ("keep", "low_rank", "sparse", "head_keep"), seed=4, method="dsee", zero_fraction=0.2),
        make_delta(backbone, ALL_PARTS, seed=5),
        make_delta(backbone, ("low_rank", "pasta"), seed=6, task_type="token-classification",
                   labels=("O", "B-PER", "I-PER", "B-LOC", "I-LOC")),
        make_delta(backbone, ("sparse", "keep"), seed=7, problem_type="regression", labels=("score",)),
        make_delta(backbone, ("low_rank",), seed=8, dtype=torch.float16),
        make_delta(backbone, (), seed=9),  # head only: rides along unmasked in the same launches
    ]


@pytest.fixture(autouse=True)
def interpreter_tiles(monkeypatch):
    """Bigger tiles than the kernel unit tests use: the interpreter runs each program in Python,
    so a whole (tiny) model needs few programs to stay fast; tests/test_triton_ops.py covers the
    small tiles, several K steps and ragged edges kernel by kernel."""
    from server.backends import triton_ops

    if triton_ops.INTERPRET:
        monkeypatch.setattr(triton_ops, "_INTERPRET_TILES", {"BLOCK_N": 32, "BLOCK_K": 32})
        monkeypatch.setattr(triton_ops, "BLOCK_M_CHOICES", (4, 8, 16))


def _check_mixed_batch(backbone: Backbone, pristine, deltas, tolerance: float, seed: int = 0) -> None:
    engine = Engine(backbone)
    assert engine.backend.name == "triton"
    prepared = [prepare(d, backbone, f"task{i}", 1) for i, d in enumerate(deltas)]
    refs = [ReferenceTask(pristine, d) for d in deltas]
    rng = random.Random(seed)
    encoded = backbone.encode(TEXTS)
    # ragged segments: 1 to 3 rows a task, shuffled so the engine has to sort them
    assignments = [(t, rng.randrange(len(encoded))) for t in range(len(deltas)) for _ in range(1 + t % 3)]
    rng.shuffle(assignments)
    outputs = engine.forward([Row(prepared[t], encoded[i]) for t, i in assignments])
    for (task, text), got in zip(assignments, outputs, strict=True):
        want = refs[task].logits(encoded[text])
        assert got.shape == want.shape, deltas[task].meta
        torch.testing.assert_close(got.float(), want, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_triton_backend_matches_reference(tokenizer, family):
    model = make_tiny_model(family)
    pristine = copy.deepcopy(model)
    backbone = Backbone(model, tokenizer, "tiny", device="cuda" if torch.cuda.is_available() else "cpu",
                        dtype=torch.float32, backend="triton")
    _check_mixed_batch(backbone, pristine, _tasks(backbone), FP32_TOLERANCE)


def test_triton_backend_plans_one_entry_per_segment(tokenizer):
    """The batch plan: pointer tables by segment, 0 where a task has no such part."""
    model = make_tiny_model("bert")
    backbone = Backbone(model, tokenizer, "tiny", device="cpu", backend="triton")
    engine = Engine(backbone)
    name = "encoder.layer.0.attention.self.query"
    deltas = [make_delta(backbone, (part,), seed=seed, modules=[name])
              for seed, part in enumerate(("keep", "low_rank", "sparse"))]
    prepared = [prepare(d, backbone, f"t{i}", 1) for i, d in enumerate(deltas)]
    segments = [(0, 2, prepared[0]), (2, 3, prepared[1]), (3, 5, prepared[2])]
    plans = engine.backend.plan(segments, seq_len=4)
    plan = plans[name]
    assert plan.mask_ptrs.tolist() == [prepared[0].modules[name].keep.packed.data_ptr(), 0, 0]
    assert plan.ranks.tolist() == [0, deltas[1].low_rank[name].rank, 0]
    assert plan.sparse.nnz.tolist() == [0, 0, deltas[2].sparse[name].index.numel()]
    assert plan.segments.num_rows == 20 and plan.sequence_segments.num_rows == 5


def test_triton_prepared_delta_costs_its_delta_bytes(tokenizer):
    from server.backends import triton_ops

    model = make_tiny_model("bert")
    backbone = Backbone(model, tokenizer, "tiny", device="cpu", backend="triton")
    delta = make_delta(backbone, ("keep", "low_rank", "pasta"), seed=3, zero_fraction=0.2)
    prepared = prepare(delta, backbone, "t", 1)
    assert prepared.backend == "triton"
    # Packed masks stay packed, nothing is widened: only each mask's padding for the GEMM's byte runs.
    masks = sum(parts.keep is not None for parts in prepared.modules.values())
    assert masks and prepared.nbytes == delta.nbytes + masks * triton_ops.MASK_PAD_BYTES


def test_engine_refuses_a_delta_prepared_for_another_backend(tokenizer):
    model = make_tiny_model("bert")
    backbone = Backbone(model, tokenizer, "tiny", device="cpu", backend="triton")
    cpu_prepared = prepare(make_delta(backbone, ("keep",), seed=1), backbone, "t", 1, backend="cpu")
    with pytest.raises(ValueError, match="prepared for the cpu backend"):
        Engine(backbone).forward([Row(cpu_prepared, backbone.encode(["x"])[0])])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_backend_half_precision_on_gpu(tokenizer, dtype):
    model = make_tiny_model("bert")
    pristine = copy.deepcopy(model)
    backbone = Backbone(model, tokenizer, "tiny", device="cuda", dtype=dtype, backend="triton")
    _check_mixed_batch(backbone, pristine, _tasks(backbone), HALF_TOLERANCE[dtype])


def test_task_slots_are_filled_once_grow_and_are_freed_with_the_task(tokenizer):
    """Per-task device tables: a slot per resident task, its pointers written once, freed on eviction."""
    import gc
    import weakref

    backbone = Backbone(make_tiny_model("bert"), tokenizer, "tiny", device="cpu", backend="triton")
    tables = Engine(backbone).backend.tables
    first_capacity = tables.capacity
    deltas = [prepare(make_delta(backbone, ("keep", "low_rank"), seed=i), backbone, f"t{i}", 1)
              for i in range(first_capacity + 4)]
    slots = [tables.slot(delta) for delta in deltas]
    assert len(set(slots)) == len(deltas) and tables.capacity > first_capacity  # grew when full
    assert tables.slot(deltas[3]) == slots[3]  # asked again: the same slot, nothing rewritten
    name = next(name for name, parts in deltas[0].modules.items() if parts.keep is not None)
    module, mask = tables.modules[name], tables.pointer_fields.index("mask_ptrs")
    assert tables.pointers[mask, module, slots[0]].item() == deltas[0].modules[name].keep.packed.data_ptr()
    assert tables.host_masked[slots[0], module]
    freed = slots[5]
    evicted = weakref.ref(deltas[5])
    del deltas[5]  # the cache evicted it and no batch holds it
    gc.collect()
    holders = [type(r).__name__ for r in gc.get_referrers(evicted())] if evicted() is not None else []
    assert evicted() is None, f"the evicted delta is still referenced by {holders}"
    assert len(tables) == len(deltas)
    newcomer = prepare(make_delta(backbone, ("sparse",), seed=99), backbone, "new", 1)
    assert tables.slot(newcomer) == freed
    assert not tables.host_masked[freed].any()  # the old task's entries are gone from the reused slot
