"""The Triton kernels as a Hopper GPU would compile them, and how often serving would compile them.

No GPU needed: `server.backends.triton_audit` compiles the launches that the host functions
really make (their specialisation: alignments, divisibility, constexprs) for sm_90, in a
subprocess with `TRITON_INTERPRET=0`, and reads the TTGIR and `cuobjdump`'s resource usage:

- every K loop of the masked GEMM is software-pipelined (async wgmma left in flight, tiles by
  async copies, the mask bytes prefetched a tile ahead), masked or not, at every row-tile height;
- no autotune config spills registers or needs more shared memory than an sm_90 block may use,
  for any row-tile height, in float16 (bfloat16 compiles to the same shapes) and float32, with the
  whole epilogue (bias, low-rank expand, sparse part);
- over 100 random batch compositions through the engine, each kernel sees only a small, fixed set
  of specialisation keys (so serving never compiles after the warm-up), every pointer 16-byte aligned.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from server.backends import triton_ops as ops

AUDIT = """
import json, torch
from server.backends import triton_ops as ops, triton_audit as audit

N, K = 1536, 384  # MiniLM's FFN in: two K tiles at least for every BLOCK_K
results = []
for dtype in DTYPES:
    for block_m in ops.block_m_choices(dtype):
        M = 2 * block_m
        x, w, b = (torch.zeros(*shape, dtype=dtype) for shape in ((M, K), (N, K), (N,)))
        plan = ops.SegmentPlan.build([0], [M], "cpu", block_m=block_m)
        zeros64, zeros32 = torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int32)
        with audit.recording() as launches:
            t = ops.lora_shrink(x, plan, zeros64, zeros32, 8)
            ops.masked_linear(x, w, b, plan, zeros64, lora=ops.LoraExpandArgs(t, zeros64, zeros32),
                              sparse=ops.SparseArgs(zeros64, zeros64, zeros32))
        for launch in launches:
            for config in launch.configs:
                compiled = audit.compile_launch(launch, config)
                results.append(dict(kernel=launch.name, dtype=str(dtype), block_m=block_m, config=compiled.config,
                                    shared=compiled.shared_bytes, spill=compiled.spill_bytes,
                                    registers=compiled.registers, k_loops=len(compiled.k_loops()),
                                    pipelining=audit.pipelining_problems(compiled)))
print(json.dumps({"block_m_choices": {str(dtype): list(ops.block_m_choices(dtype)) for dtype in DTYPES},
                  "results": results}))
"""


# Triton internals triton_audit binds launches with (as its launcher does): another Triton may lack them.
INTERNALS = ("_pack_args", "create_function_from_signature", "make_backend")


def _compile_audit(tmp_path: Path, dtypes: str) -> dict:
    """{"block_m_choices": {dtype: the row-tile heights compiled mode uses}, "results": one dict per compile}."""
    # Triton's cache is keyed by source, options and target: a shared one (TRITON_CACHE_DIR) is safe to reuse.
    env = {**os.environ, "TRITON_INTERPRET": "0",
           "TRITON_CACHE_DIR": os.environ.get("TRITON_CACHE_DIR") or str(tmp_path / "cache"),
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    code = AUDIT.replace("DTYPES", dtypes)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1500)
    if done.returncode != 0 and any(name in done.stderr for name in INTERNALS):
        pytest.skip(f"this Triton's launcher internals differ from those triton_audit binds launches with:\n"
                    f"{done.stderr[-500:]}")
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])  # (this process may be the interpreter's)


@pytest.fixture(scope="module")
def half_precision(tmp_path_factory) -> dict:
    # float16 stands for bfloat16 too: the same wgmma shapes, registers and shared memory (checked
    # once for every config with triton_audit; ~40 compiles a dtype is what keeps CI's time down).
    return _compile_audit(tmp_path_factory.mktemp("half"), "(torch.float16,)")


def test_masked_gemm_k_loops_are_software_pipelined_for_hopper(half_precision):
    gemm = [r for r in half_precision["results"] if r["kernel"] == "_masked_linear_kernel"]
    assert {r["block_m"] for r in gemm} == set(half_precision["block_m_choices"]["torch.float16"]) == {16, 32, 64, 128}
    for result in gemm:
        assert result["k_loops"] == 2, result  # the masked loop and the plain one: no branch inside either
        assert result["pipelining"] == [], result


def test_no_config_spills_or_overflows_shared_memory(half_precision, tmp_path):
    every = half_precision["results"] + _compile_audit(tmp_path, "(torch.float32,)")["results"]
    assert {r["kernel"] for r in every} == {"_masked_linear_kernel", "_lora_shrink_kernel"}
    for result in every:
        assert result["spill"] == 0, result
        assert result["shared"] <= ops.SHARED_MEMORY_LIMIT, result


def test_kernels_compile_for_hopper_without_a_gpu(tmp_path: Path) -> None:
    """Every kernel, one variant each (the delta-add one included), compiles to an sm_90 cubin."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path)}
    code = "from server.backends import triton_audit; print('\\n'.join(triton_audit.compile_for_gpu(90)))"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 3 and all("sm_90" in line for line in lines), done.stdout


# ------------------------------------------------------------------ specialisation keys in serving


def test_serving_compiles_a_fixed_small_set_of_kernels(tokenizer, monkeypatch):
    """100 random compositions (tasks, parts, rows per task, lengths) through the engine, kernels recorded,
    not run: each kernel's specialisation keys stay within the warm-up's buckets."""
    from server.backbone import Backbone
    from server.backends import triton_audit as audit
    from server.delta import prepare
    from server.engine import Engine, Row
    from tests.conftest import make_tiny_model
    from tests.factories import make_delta

    if not ops.INTERPRET and not torch.cuda.is_available():
        pytest.skip("needs the interpreter or a GPU")
    backbone = Backbone(make_tiny_model("bert"), tokenizer, "tiny", device="cuda" if torch.cuda.is_available()
                        else "cpu", dtype=torch.float32, backend="triton")
    engine = Engine(backbone)
    part_sets = [("keep",), ("low_rank",), ("sparse",), ("keep", "low_rank", "sparse", "head_keep"),
                 ("low_rank", "pasta"), ("sparse", "keep"), ()]
    deltas = [prepare(make_delta(backbone, parts, seed=seed, zero_fraction=0.1), backbone, f"t{seed}", 1)
              for seed, parts in enumerate(part_sets * 3)]
    texts = backbone.encode(["a", "a gripping, funny film", "dull and long, far too long", ("a", "b c d e")])
    rng = random.Random(0)
    keys: dict[str, set] = {}
    compositions = set()
    with audit.recording() as launches:
        for _ in range(100):
            tasks = rng.sample(deltas, rng.randint(1, len(deltas)))
            rows = [Row(task, rng.choice(texts)) for task in tasks for _ in range(rng.randint(1, 9))]
            rng.shuffle(rows)
            compositions.add(tuple(sorted((id(r.delta), len(r.text.input_ids)) for r in rows)))
            engine.run(engine.prepare(rows))
            for launch in launches:
                try:
                    key = audit.specialisation_key(launch)
                except (ImportError, AttributeError) as error:
                    if any(name in str(error) for name in INTERNALS):
                        pytest.skip(f"this Triton's launcher internals differ: {error}")
                    raise
                keys.setdefault(launch.name, set()).add(key)
                for spec in key[1]:
                    assert "*" not in spec or "'D'" in spec, (launch.name, spec)  # every pointer 16-byte aligned
            launches.clear()
    assert len(compositions) == 100
    # Buckets: row-tile height × which epilogue parts (low rank, sparse) × the mask-row alignment of the
    # module shapes (the tiny model has two: K = 32 and 64; a real encoder's are all 16) — token rows and
    # sequence rows share them; nothing else of a batch (its tasks, their count, lengths, slots) shows.
    buckets = len(ops.BLOCK_M_CHOICES)
    aligns = len({ops.mask_row_align(k) for _, k in backbone.linear_modules.values()})
    assert set(keys) == {"_masked_linear_kernel", "_lora_shrink_kernel", "_delta_add_kernel"}
    assert len(keys["_masked_linear_kernel"]) <= buckets * 4 * aligns, sorted(keys["_masked_linear_kernel"])
    assert len(keys["_lora_shrink_kernel"]) <= buckets, sorted(keys["_lora_shrink_kernel"])
    assert len(keys["_delta_add_kernel"]) <= buckets * 3, sorted(keys["_delta_add_kernel"])
