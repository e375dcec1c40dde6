"""The grouped Triton kernels against the one dense formula (`effective_weight`) on tiny shapes.

Without CUDA the kernels run in Triton's interpreter on CPU tensors (`triton_ops` switches it on
at import when no GPU is present); with one they run compiled on the GPU. Shapes are chosen to
hit the edges: ragged and one-row segments, an empty segment, masked and unmasked segments in
one launch, bit counts that are not a multiple of 8, K and N not multiples of the tiles, ranks
differing per task (0 included, and above one rank chunk), supports spanning several output tiles.

Tolerances: fp32 ≤ 1e-5 (exact fp32 products, fp32 accumulation); fp16 and bf16 against the
fp32 formula on the same rounded inputs, within a few units in the last place of the output
(rtol/atol 1e-2 for fp16, 4e-2 for bf16).
"""

from __future__ import annotations

import pytest
import torch

from adapters_store.formula import effective_weight
from adapters_store.packing import pack_bits, unpack_bits
from server.backends import triton_ops as ops

DEVICE = "cpu" if ops.INTERPRET else "cuda"
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-2, atol=1e-2),
       torch.bfloat16: dict(rtol=4e-2, atol=4e-2)}
DTYPES = list(TOL)

# Ragged: one-row segments, an empty one, one longer than several row tiles.
LENGTHS = [1, 3, 0, 17, 1, 5]


def segments(lengths: list[int]) -> tuple[list[int], list[int]]:
    starts, ends, row = [], [], 0
    for n in lengths:
        starts.append(row)
        ends.append(row + n)
        row += n
    return starts, ends


def make_plan(lengths: list[int], block_m: int | None = None) -> ops.SegmentPlan:
    starts, ends = segments(lengths)
    return ops.SegmentPlan.build(starts, ends, DEVICE, block_m=block_m)


def rand(*shape: int, dtype: torch.dtype = torch.float32, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(device=DEVICE, dtype=dtype)


def random_keep(n: int, k: int, gen: torch.Generator, zero_fraction: float = 0.3) -> torch.Tensor:
    return torch.rand(n, k, generator=gen) >= zero_fraction


def reference(x: torch.Tensor, lengths: list[int], weights: list[torch.Tensor], bias: torch.Tensor | None,
              out_dtype: torch.dtype) -> torch.Tensor:
    """Per segment, x_s W'_sᵀ + b in fp32 on the same (already rounded) inputs."""
    starts, ends = segments(lengths)
    parts = []
    for s, (a, b) in enumerate(zip(starts, ends, strict=True)):
        y = x[a:b].float() @ weights[s].float().T
        if bias is not None:
            y = y + bias.float()
        parts.append(y)
    return torch.cat(parts).to(out_dtype)


def test_plan_tiles_cover_every_row_once_and_never_straddle() -> None:
    for block_m in (None, 2, 4, 8):
        plan = make_plan(LENGTHS, block_m)
        starts, ends = segments(LENGTHS)
        covered = []
        for seg, first in zip(plan.block_seg.tolist(), plan.block_row.tolist(), strict=True):
            assert starts[seg] <= first < ends[seg]
            covered.extend(range(first, min(first + plan.block_m, ends[seg])))
        assert covered == list(range(sum(LENGTHS)))
    assert make_plan([], None).num_blocks == 0


def test_choose_block_m_prefers_tall_tiles_unless_they_waste() -> None:
    choices = ops.BLOCK_M_CHOICES
    assert ops.choose_block_m([choices[-1] * 4]) == choices[-1]
    assert ops.choose_block_m([1] * 50) == choices[0]


@pytest.mark.parametrize("dtype", DTYPES)
# 35 and 143 bits: not multiples of 8; K = 24: whole bytes per weight row (the byte-wise path), 3 K tiles.
@pytest.mark.parametrize(("n", "k"), [(5, 7), (11, 13), (9, 24)])
def test_masked_linear_mixes_masked_and_plain_segments(dtype: torch.dtype, n: int, k: int) -> None:
    gen = torch.Generator().manual_seed(n * 100 + k)
    x = rand(sum(LENGTHS), k, dtype=dtype, gen=gen)
    weight = rand(n, k, dtype=dtype, gen=gen)
    bias = rand(n, dtype=dtype, gen=gen)
    keeps = [random_keep(n, k, gen) if s % 2 == 0 else None for s in range(len(LENGTHS))]
    packed = [None if keep is None else pack_bits(keep).to(DEVICE) for keep in keeps]
    assert all(p is None or p.numel() == -(-n * k // 8) for p in packed)
    plan = make_plan(LENGTHS)
    y = ops.masked_linear(x, weight, bias, plan, ops.pointer_table(packed, DEVICE))
    weights = [effective_weight(weight.float(), keep=None if keep is None else keep.to(DEVICE)) for keep in keeps]
    expected = reference(x, LENGTHS, weights, bias, dtype)
    assert y.dtype == dtype
    torch.testing.assert_close(y, expected, **TOL[dtype])


def test_masked_linear_strided_weight_no_bias_given_output_every_bit_placed() -> None:
    gen = torch.Generator().manual_seed(1)
    n, k = 9, 10
    lengths = [2, 1, 6]
    x = rand(sum(lengths), k, gen=gen)
    weight = rand(k, n, gen=gen).T  # a strided view: read in place, never copied
    # Masks that differ in exactly one bit each: a misplaced bit shows up in the result.
    keeps = []
    for flip in (0, n * k - 1, 37):
        keep = torch.ones(n * k, dtype=torch.bool)
        keep[flip] = False
        keeps.append(keep.view(n, k))
    packed = [pack_bits(keep).to(DEVICE) for keep in keeps]
    for keep, p in zip(keeps, packed, strict=True):
        assert torch.equal(unpack_bits(p, (n, k)), keep)
    out = torch.full((sum(lengths), n), float("nan"), device=DEVICE)
    plan = make_plan(lengths, block_m=2)
    result = ops.masked_linear(x, weight, None, plan, ops.pointer_table(packed, DEVICE), out=out)
    assert result is out
    expected = reference(x, lengths, [weight * keep.to(DEVICE) for keep in keeps], None, torch.float32)
    torch.testing.assert_close(out, expected, **TOL[torch.float32])


def test_masked_linear_rejects_mismatched_shapes() -> None:
    plan = make_plan([3])
    x = torch.zeros(3, 4, device=DEVICE)
    with pytest.raises(ValueError, match="does not fit"):
        ops.masked_linear(x, torch.zeros(2, 5, device=DEVICE), None, plan, ops.pointer_table([None], DEVICE))
    with pytest.raises(ValueError, match="mask_ptrs"):
        ops.masked_linear(x, torch.zeros(2, 4, device=DEVICE), None, plan, ops.pointer_table([None, None], DEVICE))
    with pytest.raises(ValueError, match="ranks"):
        ops.lora_shrink(x, plan, ops.pointer_table([None], DEVICE), torch.zeros(1, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="plan covers"):
        ops.masked_linear(torch.zeros(4, 4, device=DEVICE), torch.zeros(2, 4, device=DEVICE), None, plan,
                          ops.pointer_table([None], DEVICE))


def lora_parts(ranks: list[int], n: int, k: int, dtype: torch.dtype, gen: torch.Generator):
    a = [rand(r, k, dtype=dtype, gen=gen) if r else None for r in ranks]
    b = [rand(n, r, dtype=dtype, gen=gen) if r else None for r in ranks]
    return a, b


# Ranks differ per task, 0 = none, 6 spans two rank chunks in the interpreter.
RANKS = [1, 4, 0, 6, 0, 2]


@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_shrink_then_expand(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    n, k = 10, 9
    x = rand(sum(LENGTHS), k, dtype=dtype, gen=gen)
    a, b = lora_parts(RANKS, n, k, dtype, gen)
    plan = make_plan(LENGTHS)
    ranks = torch.tensor(RANKS, dtype=torch.int32, device=DEVICE)
    max_rank = max(RANKS)
    t = ops.lora_shrink(x, plan, ops.pointer_table(a, DEVICE), ranks, max_rank)
    assert t.shape == (x.shape[0], max_rank) and t.dtype == torch.float32

    starts, ends = segments(LENGTHS)
    for s, (lo, hi) in enumerate(zip(starts, ends, strict=True)):
        r = RANKS[s]
        assert torch.all(t[lo:hi, r:] == 0)
        if r:
            torch.testing.assert_close(t[lo:hi, :r], x[lo:hi].float() @ a[s].float().T, **TOL[dtype])

    y0 = rand(x.shape[0], n, dtype=dtype, gen=gen)
    y = y0.clone()
    ops.lora_expand(t, plan, ops.pointer_table(b, DEVICE), ranks, y)
    for s, (lo, hi) in enumerate(zip(starts, ends, strict=True)):
        if RANKS[s] == 0:
            assert torch.equal(y[lo:hi], y0[lo:hi])  # untouched, bit for bit
        else:
            delta = effective_weight(torch.zeros(n, k, device=DEVICE), lora_A=a[s].float(), lora_B=b[s].float())
            expected = (y0[lo:hi].float() + x[lo:hi].float() @ delta.T).to(dtype)
            torch.testing.assert_close(y[lo:hi], expected, **TOL[dtype])


def sparse_parts(nnzs: list[int], n: int, k: int, dtype: torch.dtype, gen: torch.Generator):
    index, value = [], []
    for count in nnzs:
        if count == 0:
            index.append(None)
            value.append(None)
            continue
        flat = torch.randperm(n * k, generator=gen)[:count].to(DEVICE)
        sorted_index, sorted_value = ops.sort_support(flat, rand(count, dtype=dtype, gen=gen))
        index.append(sorted_index)
        value.append(sorted_value)
    return index, value


def sparse_args(index, value, nnzs: list[int]) -> ops.SparseArgs:
    return ops.SparseArgs(ops.pointer_table(index, DEVICE), ops.pointer_table(value, DEVICE),
                          torch.tensor(nnzs, dtype=torch.int32, device=DEVICE))


# Supports of different sizes; 40 entries over a 10×6 weight share output rows and span all tiles.
NNZS = [3, 0, 1, 40, 7, 0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_add(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    n, k = 10, 6
    x = rand(sum(LENGTHS), k, dtype=dtype, gen=gen)
    index, value = sparse_parts(NNZS, n, k, dtype, gen)
    y0 = rand(x.shape[0], n, dtype=dtype, gen=gen)
    y = y0.clone()
    ops.sparse_add(x, y, sparse_args(index, value, NNZS), make_plan(LENGTHS))
    starts, ends = segments(LENGTHS)
    for s, (lo, hi) in enumerate(zip(starts, ends, strict=True)):
        if NNZS[s] == 0:
            assert torch.equal(y[lo:hi], y0[lo:hi])
        else:
            delta = effective_weight(torch.zeros(n, k, device=DEVICE), sparse_index=index[s],
                                     sparse_value=value[s].float())
            expected = (y0[lo:hi].float() + x[lo:hi].float() @ delta.T).to(dtype)
            torch.testing.assert_close(y[lo:hi], expected, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_linear_with_folded_lora_and_sparse_is_the_whole_formula(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(4)
    n, k = 11, 13
    x = rand(sum(LENGTHS), k, dtype=dtype, gen=gen)
    weight = rand(n, k, dtype=dtype, gen=gen)
    bias = rand(n, dtype=dtype, gen=gen)
    keeps = [random_keep(n, k, gen) if s in (0, 3, 5) else None for s in range(len(LENGTHS))]
    packed = [None if keep is None else pack_bits(keep).to(DEVICE) for keep in keeps]
    a, b = lora_parts(RANKS, n, k, dtype, gen)
    nnzs = [2, 5, 0, 30, 0, 1]
    index, value = sparse_parts(nnzs, n, k, dtype, gen)
    plan = make_plan(LENGTHS)
    ranks = torch.tensor(RANKS, dtype=torch.int32, device=DEVICE)
    t = ops.lora_shrink(x, plan, ops.pointer_table(a, DEVICE), ranks, max(RANKS))
    lora = ops.LoraExpandArgs(t, ops.pointer_table(b, DEVICE), ranks)
    sparse = sparse_args(index, value, nnzs)
    mask_ptrs = ops.pointer_table(packed, DEVICE)

    fused = ops.masked_linear(x, weight, bias, plan, mask_ptrs, lora=lora, sparse=sparse)

    weights = [
        effective_weight(weight.float(), keep=None if keeps[s] is None else keeps[s].to(DEVICE),
                         lora_A=None if a[s] is None else a[s].float(), lora_B=None if b[s] is None else b[s].float(),
                         sparse_index=index[s], sparse_value=None if value[s] is None else value[s].float())
        for s in range(len(LENGTHS))
    ]
    torch.testing.assert_close(fused, reference(x, LENGTHS, weights, bias, dtype), **TOL[dtype])

    # The three-launch way computes the same thing (up to the output rounding between launches).
    separate = ops.masked_linear(x, weight, bias, plan, mask_ptrs)
    ops.lora_expand(t, plan, lora.b_ptrs, ranks, separate)
    ops.sparse_add(x, separate, sparse, plan)
    torch.testing.assert_close(separate, fused, **TOL[dtype])


def test_gpu_benchmark_harness_checks_every_side_on_tiny_shapes() -> None:
    """bench/gpu_kernels.py's logic (cases, tables, fused and unfused sides, output check) on tiny shapes."""
    from bench import gpu_kernels

    rows = gpu_kernels.run({"tiny": 8}, tokens=10, ks=[3], methods=["dsee"], dtype=torch.float32, device=DEVICE,
                           iters=1)
    assert [(r["shape"], r["k"]) for r in rows] == [("attn", 3), ("ffn_in", 3), ("ffn_out", 3)]
    assert all(r["grouped_ms"] > 0 for r in rows)
