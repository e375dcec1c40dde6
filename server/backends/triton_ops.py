"""Grouped Triton kernels: one launch per linear module, whatever the number of tasks in the batch.

The batch is a 2-D tensor `x [M, K]` of token rows sorted so that each task's rows are
contiguous: S *segments* `[start, end)`, one task each. A `SegmentPlan` (built once per batch,
shared by every module) cuts every segment into tiles of `block_m` rows that never straddle two
segments, so each program of a kernel serves exactly one task. Per module, each task's parts are
passed as *pointer tables*: one int64 `data_ptr()` per segment (0 = the task has no such part
there), as vLLM's multi-LoRA kernels do for their slices. Nothing is copied or stacked per
batch: the prepared tensors stay where the cache put them, packed masks stay packed.

Kernels (task-delta.md's formula, `y = x (W ⊙ K + B·A + S)ᵀ + b`):

- `masked_linear` — `y = x (W ⊙ K_s)ᵀ + b`: a tiled GEMM with fp32 accumulation in which
  each weight tile is multiplied by its task's keep bits, read from the packed mask exactly as
  stored (bit `i*K + j`, most significant first) and unpacked in registers, like BitDelta's
  binary GEMM. Rows of tasks without a mask run in the same launch on plain `W`. Nothing
  weight-sized is ever written. Optional epilogues fold the low-rank expand and the sparse
  part into the same launch (see below).
- `lora_shrink` — `t = x Aᵀ` per segment (ranks differ per task; rank 0 rows give zeros),
  output fp32 `[M, max_rank]` so the expand reads the small intermediate unrounded.
- `lora_expand` — `y += t Bᵀ` in place.
- `sparse_add` — `y += x Sᵀ` for every segment's support Ω, in place.

Why fold the expand and the sparse part into `masked_linear`'s epilogue (`lora=`, `sparse=`):
standalone, each is a launch plus one read and one write of `y` (`M×N` in fp16: 12 MB for
MPNet's FFN at 64×128 tokens, ≈ 5 µs of HBM traffic on an H200 plus ≈ 3–5 µs of launch) for
a few % of the GEMM's FLOPs, against ≈ 15 µs for the GEMM itself: folded, both ride on the
accumulator that is already in registers. The shrink is not folded: it needs the full K
reduction before the expand, and recomputing it per output tile would cost `max_rank / BLOCK_N`
of the GEMM again. This is a reasoned choice, not a measurement: `bench/gpu_kernels.py` times
both ways on a GPU.

Why the sparse part has no atomics: each program owns its `[block_m, BLOCK_N]` output tile and
adds the support entries whose output row falls in it, found by binary search in the task's
flat indices sorted ascending (`sort_support`), then scattered to the tile's columns by a
one-hot `tl.dot`. That is deterministic, accumulates in fp32 and works for bf16 (the
interpreter has no bf16 atomics). Its cost is ≈ `BLOCK_N × |Ω| / (N K)` of the GEMM: negligible
for DSEE's 16 positions per matrix; for supports of several % a scatter would win.

Precision: operands in the input's dtype (fp16/bf16/fp32, x and W of the same dtype), products
accumulated in fp32 (`input_precision="ieee"` for fp32, so no TF32 rounding), output in x's
dtype.

Without CUDA the kernels can only run in Triton's interpreter (`TRITON_INTERPRET=1`, on CPU
tensors); that is how CI tests them. `@triton.jit` reads that switch when the kernels are
defined, so this module sets it at import when no GPU is present (the environment variable, so
the process's other Triton users see the same), and then uses tiny tiles (the interpreter runs
every program in Python). On a GPU the tile shapes are autotuned. `compile_for_gpu` compiles the
kernels to Hopper cubins on a machine without a GPU, so CI also checks the compiled path.

Open for measurement on a GPU (not done: no GPU in the session that wrote this): the keep-mask
branch sits inside the K loop (uniform per program; Triton may not software-pipeline the mask
loads there); the autotune configs are educated guesses; fused vs unfused epilogue, and the grouped
kernel vs cuBLAS for rows without a mask, are what `bench/gpu_kernels.py` times.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from server.backends.uploads import ALIGN_BYTES, upload_int_tables

# `@triton.jit` reads the switch when each kernel below is defined, so setting it here is enough even
# when triton was imported earlier (transformers imports it). For the same reason the kernels avoid
# triton.language's own jit helpers (`tl.zeros`, `tl.cdiv`): those were defined at triton's import,
# possibly compiled-mode, and the interpreter cannot call them. `tl.full` is a builtin.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Candidate row-tile heights for SegmentPlan (tl.dot needs ≥ 16 on a GPU; the interpreter takes any).
BLOCK_M_CHOICES = (2, 4, 8) if INTERPRET else (16, 32, 64, 128)
# fp32 operands multiply on the FMA units (exact products, no wgmma): a 128-row tile needs more
# registers than a thread has with any of the configs (measured: spills), so fp32 stops at 64.
FP32_MAX_BLOCK_M = 64
# Fixed tiles in the interpreter; autotuned on a GPU (BLOCK_M always comes from the plan).
_INTERPRET_TILES = {"BLOCK_N": 8, "BLOCK_K": 8}
_INTERPRET_R = 4  # rank chunk (and sparse entry chunk) in the interpreter
MASK_PAD_BYTES = 32  # ≥ the widest BLOCK_K / 8: masks carry this much padding after their bits
RANK_PAD = 16  # lora_shrink's output width is a multiple of this (an aligned, composition-free stride)


# --------------------------------------------------------------------------------------------
# The batch plan
# --------------------------------------------------------------------------------------------


@dataclass
class SegmentPlan:
    """Where each task's rows are, and which `block_m`-row tile belongs to which segment.

    All tensors int32 on the batch's device, built once per batch and shared by every module.
    Tile `b` covers rows `[block_row[b], min(block_row[b] + block_m, seg_end[block_seg[b]]))`.
    """

    seg_start: torch.Tensor  # [S]
    seg_end: torch.Tensor  # [S]
    block_seg: torch.Tensor  # [B]
    block_row: torch.Tensor  # [B]
    block_m: int
    num_rows: int

    @property
    def num_segments(self) -> int:
        return self.seg_start.numel()

    @property
    def num_blocks(self) -> int:
        return self.block_seg.numel()

    @classmethod
    def build(cls, starts: list[int], ends: list[int], device: torch.device | str,
              block_m: int | None = None) -> SegmentPlan:
        """From host lists; one host-to-device copy. `block_m=None` picks it (`choose_block_m`)."""
        host = cls.host_tables(starts, ends, block_m)
        return host.on_device(upload_int_tables(host.tables, torch.int32, device))

    @staticmethod
    def host_tables(starts: list[int], ends: list[int], block_m: int | None = None,
                    dtype: torch.dtype = torch.float16) -> HostSegmentPlan:
        """The plan's tables as host lists, to upload with others in one copy (`HostSegmentPlan.on_device`)."""
        if len(starts) != len(ends):
            raise ValueError("starts and ends differ in length")
        if any(e < s for s, e in zip(starts, ends, strict=True)):
            raise ValueError("a segment ends before it starts")
        if block_m is None:
            block_m = choose_block_m([e - s for s, e in zip(starts, ends, strict=True)], dtype)
        block_seg: list[int] = []
        block_row: list[int] = []
        for seg, (start, end) in enumerate(zip(starts, ends, strict=True)):
            rows = range(start, end, block_m)
            block_seg.extend([seg] * len(rows))
            block_row.extend(rows)
        return HostSegmentPlan([list(starts), list(ends), block_seg, block_row], block_m, max(ends, default=0))


@dataclass
class HostSegmentPlan:
    """A `SegmentPlan`'s four tables (seg_start, seg_end, block_seg, block_row) still on the host."""

    tables: list[list[int]]
    block_m: int
    num_rows: int

    def on_device(self, uploaded: list[torch.Tensor]) -> SegmentPlan:
        """The plan from its four tables once uploaded (int32, in `tables`' order)."""
        seg_start, seg_end, block_seg, block_row = uploaded
        return SegmentPlan(seg_start, seg_end, block_seg, block_row, self.block_m, self.num_rows)


def block_m_choices(dtype: torch.dtype) -> tuple[int, ...]:
    """The row-tile heights a batch's plan may pick for operands of `dtype`."""
    if INTERPRET or dtype != torch.float32:
        return BLOCK_M_CHOICES
    return tuple(block_m for block_m in BLOCK_M_CHOICES if block_m <= FP32_MAX_BLOCK_M)


def choose_block_m(lengths: list[int], dtype: torch.dtype = torch.float16, max_waste: float = 0.25) -> int:
    """The tallest row tile whose padding (tiles never straddle segments) wastes ≤ `max_waste`.

    Tall tiles reuse each weight tile across more rows; short ones waste nothing on short
    segments (at 256 tasks in 64×128 tokens a segment is 32 rows).
    """
    rows = max(sum(lengths), 1)
    choices = block_m_choices(dtype)
    best = choices[0]
    for block_m in choices:
        padded = sum(-(-n // block_m) * block_m for n in lengths)
        if padded <= rows * (1 + max_waste):
            best = block_m
    return best


def mask_row_align(k: int) -> int:
    """The masked GEMM's `MASK_ROW_ALIGN` for in-features k: 0 when k is not a multiple of 8 (bits of
    a weight row straddle bytes), else the largest power of two ≤ 16 dividing a row's k/8 bytes."""
    if k % 8:
        return 0
    align = 1
    while align < ALIGN_BYTES and (k // 8) % (align * 2) == 0:
        align *= 2
    return align


def pointer_table(tensors: list[torch.Tensor | None], device: torch.device | str) -> torch.Tensor:
    """int64 `[S]`: each tensor's `data_ptr()`, 0 for None. The tensors must stay alive while used."""
    return torch.tensor([0 if t is None else t.data_ptr() for t in tensors], dtype=torch.int64).to(device)


def sort_support(flat_index: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A sparse support as `sparse_add` wants it: flat indices ascending (int64), values alongside."""
    order = torch.argsort(flat_index)
    return flat_index[order].to(torch.int64).contiguous(), values[order].contiguous()


@dataclass
class LoraExpandArgs:
    """The expand half of the low-rank part, for `masked_linear(..., lora=)` or `lora_expand`.

    `t` is `lora_shrink`'s output `[M, max_rank]`; `b_ptrs[s]` points at task s's `B [N, r_s]`
    (contiguous, in the weight's dtype); `ranks[s]` = r_s, 0 = no low-rank part.
    """

    t: torch.Tensor
    b_ptrs: torch.Tensor  # int64 [S]
    ranks: torch.Tensor  # int32 [S]


@dataclass
class SparseArgs:
    """The sparse part: per segment a sorted flat-index tensor (int64 `[nnz_s]`, see `sort_support`)
    and its values (weight's dtype), as pointer tables, and the entry counts (int32, 0 = none)."""

    index_ptrs: torch.Tensor  # int64 [S]
    value_ptrs: torch.Tensor  # int64 [S]
    nnz: torch.Tensor  # int32 [S]


# --------------------------------------------------------------------------------------------
# Device helpers shared by the kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _tile_rows(block_seg_ptr, block_row_ptr, seg_end_ptr, pid_m, BLOCK_M: tl.constexpr):
    """The segment of row tile `pid_m`, its row indices and which of them are real rows."""
    seg = tl.load(block_seg_ptr + pid_m)
    first = tl.load(block_row_ptr + pid_m)
    end = tl.load(seg_end_ptr + seg)
    rows = first + tl.arange(0, BLOCK_M)
    return seg, rows, rows < end


@triton.jit
def _add_lora_expand(acc, seg, rows, row_ok, offs_n, n_ok, N,
                     t_ptr, stride_tm, b_ptrs, ranks_ptr,
                     BLOCK_R: tl.constexpr, ELEM: tl.constexpr, DOT_DTYPE: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    """acc += t[rows, :r] · B[offs_n, :r]ᵀ for this segment's B (r = 0: nothing)."""
    rank = tl.load(ranks_ptr + seg)
    b_ptr = tl.load(b_ptrs + seg).to(tl.pointer_type(ELEM))
    offs_r = tl.arange(0, BLOCK_R)
    for r0 in range(0, rank, BLOCK_R):
        r_ok = (r0 + offs_r) < rank
        t = tl.load(t_ptr + rows[:, None] * stride_tm + (r0 + offs_r)[None, :],
                    mask=row_ok[:, None] & r_ok[None, :], other=0.0)
        # B is [N, r] row-major; load its transpose tile [BLOCK_R, BLOCK_N].
        b = tl.load(b_ptr + offs_n[None, :].to(tl.int64) * rank + (r0 + offs_r)[:, None],
                    mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        acc += tl.dot(t.to(DOT_DTYPE), b.to(DOT_DTYPE), input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _add_sparse(acc, seg, rows, row_ok, n0, K,
                x_ptr, stride_xm, stride_xk, index_ptrs, value_ptrs, nnz_ptr,
                BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
                ELEM: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc[:, i - n0] += x[rows, j] · v for this segment's entries (i, j, v) with n0 ≤ i < n0 + BLOCK_N."""
    nnz = tl.load(nnz_ptr + seg)
    idx_ptr = tl.load(index_ptrs + seg).to(tl.pointer_type(tl.int64))
    val_ptr = tl.load(value_ptrs + seg).to(tl.pointer_type(ELEM))
    # The tile's entries are one run of the ascending flat indices: [n0*K, (n0+BLOCK_N)*K).
    lo_bound = n0.to(tl.int64) * K
    hi_bound = lo_bound + BLOCK_N * K
    first = _lower_bound(idx_ptr, nnz, lo_bound)
    last = _lower_bound(idx_ptr, nnz, hi_bound)
    offs_e = tl.arange(0, BLOCK_E)
    cols_n = tl.arange(0, BLOCK_N)
    for e0 in range(first, last, BLOCK_E):
        e_ok = (e0 + offs_e) < last
        flat = tl.load(idx_ptr + e0 + offs_e, mask=e_ok, other=0)
        value = tl.load(val_ptr + e0 + offs_e, mask=e_ok, other=0.0).to(tl.float32)
        out_col = (flat // K - n0).to(tl.int32)
        in_col = flat % K
        xg = tl.load(x_ptr + rows[:, None] * stride_xm + in_col[None, :] * stride_xk,
                     mask=row_ok[:, None] & e_ok[None, :], other=0.0)
        contrib = (xg.to(tl.float32) * value[None, :]).to(ELEM).to(DOT_DTYPE)  # [BLOCK_M, BLOCK_E]
        # Scatter the entries to their output columns by a one-hot matmul: no atomics.
        one_hot = ((out_col[:, None] == cols_n[None, :]) & e_ok[:, None]).to(DOT_DTYPE)  # [BLOCK_E, BLOCK_N]
        acc += tl.dot(contrib, one_hot, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _mask_bytes(keep_ptr, offs_n, n_ok, k0, K, BLOCK_K: tl.constexpr, MASK_ROW_ALIGN: tl.constexpr):
    """The [BLOCK_N, BLOCK_K // 8] packed keep bytes of W's tile at rows offs_n, columns k0..k0+BLOCK_K.

    For K a multiple of 8 (every real encoder; `MASK_ROW_ALIGN` > 0): a tile row's bits are whole,
    contiguous bytes, each weight row's bytes starting at a multiple of `MASK_ROW_ALIGN` (told to
    the compiler, with the mask's 16-byte aligned start, so the run is one vector load). No mask
    along k: past K (the last tile when BLOCK_K does not divide K) the bytes are the next weight
    row's, or the `MASK_PAD_BYTES` of padding every mask carries, and they only multiply weight
    columns that were loaded as 0; a tile wholly past K (the prefetch after the last) loads nothing.
    """
    byte_k = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    row_byte = tl.multiple_of(offs_n.to(tl.int64) * (K // 8), MASK_ROW_ALIGN)  # int64: any weight size
    return tl.load(tl.multiple_of(keep_ptr, 16) + row_byte[:, None] + byte_k[None, :],
                   mask=n_ok[:, None] & (tl.full((1, BLOCK_K // 8), k0, tl.int32) < K), other=0)


@triton.jit
def _unpack_bytes(byte, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_N, BLOCK_K // 8] bytes -> [BLOCK_N, BLOCK_K] bits (most significant first), in registers."""
    shift = (7 - tl.arange(0, 8)).to(tl.uint8)
    bits = (byte[:, :, None] >> shift[None, None, :]) & 1  # [BLOCK_N, BLOCK_K // 8, 8]
    return tl.reshape(bits, (BLOCK_N, BLOCK_K))


@triton.jit
def _keep_bits_bitwise(keep_ptr, offs_n, n_ok, k, k_ok, K):
    """The keep bits of W's tile when K is not a multiple of 8 (bits of a row straddle bytes; tests only):
    every bit loads its own byte."""
    bit = offs_n.to(tl.int64)[:, None] * K + k[None, :]
    byte = tl.load(keep_ptr + (bit >> 3), mask=n_ok[:, None] & k_ok[None, :], other=0)
    return (byte >> (7 - (bit & 7)).to(tl.uint8)) & 1


@triton.jit
def _weight_times_rows(x_ptr, w_ptr, keep_ptr, rows, row_ok, offs_n, n_ok, K,
                       stride_xm, stride_xk, stride_wn, stride_wk,
                       MASKED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       MASK_ROW_ALIGN: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """accᵀ [BLOCK_N, BLOCK_M] = (W ⊙ K)[offs_n] · x[rows]ᵀ over the whole K, in fp32.

    Transposed on purpose: the (masked) weight tile is the dot's *first* operand, which Hopper's
    wgmma may read from registers, so masking it in registers costs no round trip through shared
    memory; the row tile is the second operand, read from shared memory, where any height ≥ 8
    is a valid wgmma shape (16-row tiles keep wgmma). The loop has no branch: `MASKED` is a
    compile-time switch, so both loops software-pipeline: x and W tiles arrive by async copies
    `num_stages` ahead, wgmma stays in flight across iterations, and the next tile's mask bytes
    are loaded one iteration ahead into registers (Triton's pipeliner does not stage a load that
    is unpacked before the dot, so that prefetch is written out here).
    """
    acc = tl.full((BLOCK_N, BLOCK_M), 0.0, tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    if MASKED and MASK_ROW_ALIGN > 0:
        next_bytes = _mask_bytes(keep_ptr, offs_n, n_ok, 0, K, BLOCK_K, MASK_ROW_ALIGN)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_ok = k < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + k[None, :] * stride_wk,
                    mask=n_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_K]
        if MASKED:
            if MASK_ROW_ALIGN > 0:
                keep = _unpack_bytes(next_bytes, BLOCK_N, BLOCK_K)
                next_bytes = _mask_bytes(keep_ptr, offs_n, n_ok, k0 + BLOCK_K, K, BLOCK_K, MASK_ROW_ALIGN)
            else:
                keep = _keep_bits_bitwise(keep_ptr, offs_n, n_ok, k, k_ok, K)
            w = tl.where(keep != 0, w, 0.0).to(w.dtype)
        acc += tl.dot(w.to(DOT_DTYPE), tl.trans(x.to(DOT_DTYPE)), input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _lower_bound(ptr, n, value):
    """First position p in the ascending ptr[0:n] with ptr[p] ≥ value (n if none)."""
    lo = n * 0
    hi = n
    while lo < hi:
        mid = (lo + hi) // 2
        below = tl.load(ptr + mid) < value
        lo = tl.where(below, mid + 1, lo)
        hi = tl.where(below, hi, mid)
    return lo


@triton.jit
def _epilogue(acc, seg, rows, row_ok, offs_n, n_ok, n0, N, K,
              y_ptr, stride_ym, stride_yn, bias_ptr,
              x_ptr, stride_xm, stride_xk,
              t_ptr, stride_tm, b_ptrs, ranks_ptr,
              index_ptrs, value_ptrs, nnz_ptr,
              HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_SPARSE: tl.constexpr,
              ACCUMULATE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
              ELEM: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Bias, low-rank expand and sparse part on the fp32 tile, then store (or add) into y."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_LORA:
        acc = _add_lora_expand(acc, seg, rows, row_ok, offs_n, n_ok, N, t_ptr, stride_tm, b_ptrs, ranks_ptr,
                               BLOCK_R, ELEM, DOT_DTYPE, DOT_PRECISION)
    if HAS_SPARSE:
        acc = _add_sparse(acc, seg, rows, row_ok, n0, K, x_ptr, stride_xm, stride_xk,
                          index_ptrs, value_ptrs, nnz_ptr, BLOCK_N, BLOCK_R, ELEM, DOT_DTYPE, DOT_PRECISION)
    y_tile = y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn
    ok = row_ok[:, None] & n_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(y_tile, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_tile, acc.to(y_ptr.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


# Shared memory an sm_90 block may use (H100/H200: 227 KiB). Configs over it never launch.
SHARED_MEMORY_LIMIT = 232_448


def _gemm_configs() -> list[triton.Config]:
    """The masked GEMM's candidate tiles. BLOCK_N is wgmma's M side (64 rows a warpgroup), so 4 warps
    take 64 and 8 warps 128. `_prune_gemm` keeps, per launch, those that fit: every kept one compiles
    for sm_90 without spilling and within shared memory, for every row-tile height and dtype
    (checked in CI by `tests/test_triton_compiled.py`)."""
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bn, bk, w, s in [(64, 64, 4, 4), (64, 128, 4, 3), (128, 64, 8, 3), (128, 32, 8, 4)]
    ]


def gemm_shared_bytes(block_m: int, block_n: int, block_k: int, stages: int, element_size: int) -> int:
    """Shared memory the pipelined masked GEMM takes: `stages` buffers of the x and W tiles (measured
    from the compiled kernels: exactly that for 16-bit operands, 1.5 times that for fp32, whose FMA
    dot stages a converted copy), plus the mask bytes' margin."""
    tiles = stages * (block_m + block_n) * block_k * element_size
    return (tiles * 3 // 2 if element_size == 4 else tiles) + stages * block_n * block_k // 8


def gemm_fp32_registers(block_m: int, block_n: int, block_k: int, warps: int) -> float:
    """fp32 values per thread the FMA dot holds (accumulator and both operand tiles). A rough guide:
    of the configs above, those at 96 or more spilled when compiled for sm_90 and those below did
    not (measured: the CI test compiles every kept one); 16-bit wgmma configs never spilled."""
    return (block_n * block_m + (block_n + block_m) * block_k) / (32 * warps)


def _prune_gemm(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    element_size = named_args["x_ptr"].element_size()
    block_m = kwargs.get("BLOCK_M", named_args.get("BLOCK_M"))
    fit = []
    for config in configs:
        block_n, block_k = config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"]
        if gemm_shared_bytes(block_m, block_n, block_k, config.num_stages, element_size) > SHARED_MEMORY_LIMIT:
            continue
        if element_size == 4 and gemm_fp32_registers(block_m, block_n, block_k, config.num_warps) >= 96:
            continue
        fit.append(config)
    return fit or configs[-1:]


def _autotuned(configs, key, restore_value=(), prune=None):
    """`triton.autotune` on a GPU; the interpreter runs the fixed tiny tiles instead.

    Keys never depend on a batch's composition beyond buckets: N and K are the module's shape,
    BLOCK_M one of `BLOCK_M_CHOICES`; so each key is tuned once (at `warm_up`), never while serving.
    """
    if INTERPRET:
        return lambda fn: fn
    return triton.autotune(configs=configs, key=key, restore_value=list(restore_value),
                           prune_configs_by={"early_config_prune": prune} if prune else None)


@_autotuned(_gemm_configs(), key=["N", "K", "BLOCK_M"], prune=_prune_gemm)
@triton.jit
def _masked_linear_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr,
    seg_end_ptr, block_seg_ptr, block_row_ptr, mask_ptrs,
    t_ptr, b_ptrs, ranks_ptr, index_ptrs, value_ptrs, nnz_ptr,
    N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn, stride_tm,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_SPARSE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    ELEM: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, MASK_ROW_ALIGN: tl.constexpr,
):
    pid_n = tl.program_id(0)  # fastest: neighbouring programs share the row tile and its mask
    pid_m = tl.program_id(1)
    seg, rows, row_ok = _tile_rows(block_seg_ptr, block_row_ptr, seg_end_ptr, pid_m, BLOCK_M)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    mask_addr = tl.load(mask_ptrs + seg)
    # Uniform per program, decided once, outside the K loop: two branch-free, pipelined loops.
    if mask_addr != 0:
        acc_t = _weight_times_rows(x_ptr, w_ptr, mask_addr.to(tl.pointer_type(tl.uint8)), rows, row_ok, offs_n,
                                   n_ok, K, stride_xm, stride_xk, stride_wn, stride_wk, True,
                                   BLOCK_M, BLOCK_N, BLOCK_K, MASK_ROW_ALIGN, DOT_DTYPE, DOT_PRECISION)
    else:
        acc_t = _weight_times_rows(x_ptr, w_ptr, mask_ptrs, rows, row_ok, offs_n,
                                   n_ok, K, stride_xm, stride_xk, stride_wn, stride_wk, False,
                                   BLOCK_M, BLOCK_N, BLOCK_K, MASK_ROW_ALIGN, DOT_DTYPE, DOT_PRECISION)
    acc = tl.trans(acc_t)  # [BLOCK_M, BLOCK_N] for the epilogue: one layout change per output tile

    _epilogue(acc, seg, rows, row_ok, offs_n, n_ok, n0, N, K,
              y_ptr, stride_ym, stride_yn, bias_ptr, x_ptr, stride_xm, stride_xk,
              t_ptr, stride_tm, b_ptrs, ranks_ptr, index_ptrs, value_ptrs, nnz_ptr,
              HAS_BIAS, HAS_LORA, HAS_SPARSE, False, BLOCK_N, BLOCK_R, ELEM, DOT_DTYPE, DOT_PRECISION)


@_autotuned([triton.Config({"BLOCK_N": bn}, num_warps=w) for bn, w in [(64, 4), (128, 8)]],
            key=["N", "K", "BLOCK_M"], restore_value=["y_ptr"])
@triton.jit
def _delta_add_kernel(
    x_ptr, y_ptr,
    seg_end_ptr, block_seg_ptr, block_row_ptr,
    t_ptr, b_ptrs, ranks_ptr, index_ptrs, value_ptrs, nnz_ptr,
    N, K,
    stride_xm, stride_xk, stride_ym, stride_yn, stride_tm,
    HAS_LORA: tl.constexpr, HAS_SPARSE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    ELEM: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """y += (low-rank expand and/or sparse part) on each row tile: the epilogue without the GEMM."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    seg, rows, row_ok = _tile_rows(block_seg_ptr, block_row_ptr, seg_end_ptr, pid_m, BLOCK_M)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    _epilogue(acc, seg, rows, row_ok, offs_n, n_ok, n0, N, K,
              y_ptr, stride_ym, stride_yn, y_ptr, x_ptr, stride_xm, stride_xk,
              t_ptr, stride_tm, b_ptrs, ranks_ptr, index_ptrs, value_ptrs, nnz_ptr,
              False, HAS_LORA, HAS_SPARSE, True, BLOCK_N, BLOCK_R, ELEM, DOT_DTYPE, DOT_PRECISION)


@_autotuned([triton.Config({"BLOCK_K": bk}, num_warps=w, num_stages=s) for bk, w, s in
             [(64, 4, 3), (128, 4, 3), (256, 4, 2)]],
            key=["K", "BLOCK_M", "BLOCK_R"])
@triton.jit
def _lora_shrink_kernel(
    x_ptr, t_ptr, seg_end_ptr, block_seg_ptr, block_row_ptr, a_ptrs, ranks_ptr,
    K, R,
    stride_xm, stride_xk, stride_tm,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    ELEM: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """t[rows, r0:r0+BLOCK_R] = x[rows] · A[r0:r0+BLOCK_R]ᵀ (zeros past the segment's rank), in fp32."""
    pid_r = tl.program_id(0)
    pid_m = tl.program_id(1)
    seg, rows, row_ok = _tile_rows(block_seg_ptr, block_row_ptr, seg_end_ptr, pid_m, BLOCK_M)
    rank = tl.load(ranks_ptr + seg)
    a_ptr = tl.load(a_ptrs + seg).to(tl.pointer_type(ELEM))
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = offs_r < rank
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
    if pid_r * BLOCK_R < rank:
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            k_ok = k < K
            x = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :] * stride_xk,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            # A is [r, K] row-major; its transpose tile [BLOCK_K, BLOCK_R].
            a = tl.load(a_ptr + offs_r[None, :].to(tl.int64) * K + k[:, None],
                        mask=k_ok[:, None] & r_ok[None, :], other=0.0)
            acc += tl.dot(x.to(DOT_DTYPE), a.to(DOT_DTYPE), input_precision=DOT_PRECISION)
    tl.store(t_ptr + rows[:, None] * stride_tm + offs_r[None, :], acc,
             mask=row_ok[:, None] & (offs_r < R)[None, :])


# --------------------------------------------------------------------------------------------
# Host API
# --------------------------------------------------------------------------------------------


def launch(kernel, grid, *args, **meta) -> None:
    """Every launch of this module goes through here: one place where the compile-only audit
    (`server/backends/triton_audit.py`) and the specialisation tests observe the real launches."""
    kernel[grid](*args, **meta)


def _dtypes(dtype: torch.dtype) -> dict:
    """ELEM: the operands' storage type; DOT_DTYPE: what tl.dot multiplies (the same, except in
    the interpreter, whose bf16 dot is wrong: there bf16 operands are widened to fp32, exactly)."""
    elem = _tl_dtype(dtype)
    dot = tl.float32 if INTERPRET and dtype == torch.bfloat16 else elem
    return {"ELEM": elem, "DOT_DTYPE": dot, "DOT_PRECISION": _dot_precision(dtype)}


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 operands: exact fp32 products (the default would round them to TF32). Others: ignored.
    return "ieee" if dtype == torch.float32 else "tf32"


def _tl_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


def _rank_block(max_rank: int) -> int:
    if INTERPRET:
        return _INTERPRET_R
    return 16 if max_rank <= 16 else 32  # tl.dot needs ≥ 16; larger ranks loop over chunks


def _launch_meta(**fixed: int) -> dict[str, int]:
    """Tile sizes to pass explicitly: all of them in the interpreter, none that autotune picks."""
    return {**_INTERPRET_TILES, **fixed} if INTERPRET else fixed


def _check_tables(plan: SegmentPlan, **tables: torch.Tensor) -> None:
    """Per-segment tables: one entry per segment, int64 pointers, int32 counts (shape and dtype only: no sync)."""
    for name, table in tables.items():
        want = torch.int64 if name.endswith("ptrs") else torch.int32
        if table.shape != (plan.num_segments,) or table.dtype != want:
            raise ValueError(f"{name}: expected {want} [{plan.num_segments}], got {table.dtype} {list(table.shape)}")


def _check_rows(x: torch.Tensor, plan: SegmentPlan) -> None:
    if x.dim() != 2:
        raise ValueError(f"expected 2-D rows, got shape {tuple(x.shape)}")
    if x.shape[0] != plan.num_rows:
        raise ValueError(f"plan covers {plan.num_rows} rows, tensor has {x.shape[0]}")



def masked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, plan: SegmentPlan,
                  mask_ptrs: torch.Tensor, out: torch.Tensor | None = None, *,
                  lora: LoraExpandArgs | None = None, sparse: SparseArgs | None = None) -> torch.Tensor:
    """`y[r] = x[r] (W ⊙ K_s)ᵀ + b` for the rows r of every segment s, in one launch.

    `mask_ptrs[s]` is the `data_ptr()` of task s's packed keep mask (uint8, task-delta.md's
    packing) or 0 for plain W. `lora=` adds `t Bᵀ` and `sparse=` adds `x Sᵀ` in the epilogue.
    x and W share one dtype (fp16, bf16 or fp32); accumulation is fp32; y has x's dtype.
    """
    _check_rows(x, plan)
    N, K = weight.shape
    if x.shape[1] != K or x.dtype != weight.dtype:
        raise ValueError(f"x {tuple(x.shape)} {x.dtype} does not fit weight {tuple(weight.shape)} {weight.dtype}")
    _check_tables(plan, mask_ptrs=mask_ptrs)
    if lora is not None:
        _check_tables(plan, b_ptrs=lora.b_ptrs, ranks=lora.ranks)
    if sparse is not None:
        _check_tables(plan, index_ptrs=sparse.index_ptrs, value_ptrs=sparse.value_ptrs, nnz=sparse.nnz)
    if out is None:
        out = torch.empty((x.shape[0], N), device=x.device, dtype=x.dtype)
    if plan.num_blocks == 0:
        return out
    t, b_ptrs, ranks = (lora.t, lora.b_ptrs, lora.ranks) if lora else (x, mask_ptrs, mask_ptrs)
    index_ptrs, value_ptrs, nnz = (sparse.index_ptrs, sparse.value_ptrs, sparse.nnz) if sparse else \
        (mask_ptrs, mask_ptrs, mask_ptrs)

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]), plan.num_blocks)

    launch(_masked_linear_kernel, grid,
        x, weight, bias if bias is not None else x, out,
        plan.seg_end, plan.block_seg, plan.block_row, mask_ptrs,
        t, b_ptrs, ranks, index_ptrs, value_ptrs, nnz,
        N, K,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), out.stride(0), out.stride(1), t.stride(0),
        HAS_BIAS=bias is not None, HAS_LORA=lora is not None, HAS_SPARSE=sparse is not None,
        MASK_ROW_ALIGN=mask_row_align(K), **_dtypes(x.dtype),
        **_launch_meta(BLOCK_M=plan.block_m, BLOCK_R=_rank_block(t.shape[1] if lora else 16)),
    )
    return out


def lora_shrink(x: torch.Tensor, plan: SegmentPlan, a_ptrs: torch.Tensor, ranks: torch.Tensor,
                max_rank: int) -> torch.Tensor:
    """`t[r, :r_s] = x[r] A_sᵀ` for the rows of every segment s; fp32 `[M, max_rank]`, zeros past r_s.

    `a_ptrs[s]` points at task s's `A [r_s, K]` (contiguous, x's dtype); `ranks[s]` = r_s, 0 = none.
    The result is a view of a buffer `RANK_PAD`-wide columns wide, so that its row stride (which
    Triton specialises on) is the same whatever the batch's largest rank.
    """
    _check_rows(x, plan)
    _check_tables(plan, a_ptrs=a_ptrs, ranks=ranks)
    width = -(-max_rank // RANK_PAD) * RANK_PAD
    t = torch.empty((x.shape[0], width), device=x.device, dtype=torch.float32)
    if plan.num_blocks == 0 or max_rank == 0:
        return t.zero_()[:, :max_rank]
    block_r = _rank_block(max_rank)
    meta = {"BLOCK_M": plan.block_m, "BLOCK_R": block_r}
    if INTERPRET:
        meta["BLOCK_K"] = _INTERPRET_TILES["BLOCK_K"]
    launch(_lora_shrink_kernel, (triton.cdiv(width, block_r), plan.num_blocks),
           x, t, plan.seg_end, plan.block_seg, plan.block_row, a_ptrs, ranks,
           x.shape[1], width,
           x.stride(0), x.stride(1), t.stride(0),
           **_dtypes(x.dtype), **meta)
    return t[:, :max_rank]


def _delta_add(y: torch.Tensor, plan: SegmentPlan, x: torch.Tensor | None, K: int, lora: LoraExpandArgs | None,
               sparse: SparseArgs | None, dtype: torch.dtype) -> None:
    if plan.num_blocks == 0:
        return
    N = y.shape[1]
    x_arg = x if x is not None else y
    t, b_ptrs, ranks = (lora.t, lora.b_ptrs, lora.ranks) if lora else (y, plan.seg_end, plan.seg_end)
    index_ptrs, value_ptrs, nnz = (sparse.index_ptrs, sparse.value_ptrs, sparse.nnz) if sparse else \
        (plan.seg_end, plan.seg_end, plan.seg_end)

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]), plan.num_blocks)

    launch(_delta_add_kernel, grid,
        x_arg, y, plan.seg_end, plan.block_seg, plan.block_row,
        t, b_ptrs, ranks, index_ptrs, value_ptrs, nnz,
        N, K,
        x_arg.stride(0), x_arg.stride(1), y.stride(0), y.stride(1), t.stride(0),
        HAS_LORA=lora is not None, HAS_SPARSE=sparse is not None,
        **_dtypes(dtype),
        **({"BLOCK_M": plan.block_m, "BLOCK_R": _rank_block(t.shape[1] if lora else 16)}
           | ({"BLOCK_N": _INTERPRET_TILES["BLOCK_N"]} if INTERPRET else {})),
    )


def lora_expand(t: torch.Tensor, plan: SegmentPlan, b_ptrs: torch.Tensor, ranks: torch.Tensor,
                y: torch.Tensor) -> None:
    """`y[r] += t[r, :r_s] B_sᵀ` in place; rows of rank-0 segments untouched.

    `b_ptrs[s]` points at task s's `B [N, r_s]` (contiguous, y's dtype); `t` from `lora_shrink`.
    """
    _check_rows(y, plan)
    _check_tables(plan, b_ptrs=b_ptrs, ranks=ranks)
    _delta_add(y, plan, None, 0, LoraExpandArgs(t, b_ptrs, ranks), None, y.dtype)


def sparse_add(x: torch.Tensor, y: torch.Tensor, sparse: SparseArgs, plan: SegmentPlan) -> None:
    """`y[r, i] += x[r, j] · v` for every entry (flat index i*K + j, value v) of segment s's support, r in s.

    One launch over every segment's support; each support's indices ascending (`sort_support`),
    values in x's dtype. No atomics: each program owns an output tile (see the module docstring).
    """
    _check_rows(x, plan)
    _check_rows(y, plan)
    _check_tables(plan, index_ptrs=sparse.index_ptrs, value_ptrs=sparse.value_ptrs, nnz=sparse.nnz)
    _delta_add(y, plan, x, x.shape[1], None, sparse, x.dtype)


def warm_up(backbone) -> float:
    """Compile and autotune, now, every specialisation that serving can launch for this backbone.

    Serving's specialisation keys are a fixed, small set (`tests/test_triton_compiled.py` checks
    it): per kernel the row-tile height (`BLOCK_M_CHOICES`), which epilogue parts run, the rank
    chunk, the module shapes' alignment and the dtype; the tables, rows and strides are always
    16-byte aligned. This launches each of them once on zeros (rank 0, no entries: nothing but the
    compile and the autotuning), so that no batch waits seconds for a compile under the engine lock.
    With a persistent `TRITON_CACHE_DIR` (docs/gpu.md), a restart finds the compiled kernels on disk.
    Returns the seconds taken; nothing to do in the interpreter.
    """
    import time

    if INTERPRET:
        return 0.0
    started = time.perf_counter()
    device, dtype = backbone.device, backbone.dtype
    shapes = {(n, k, backbone.model.get_submodule(name).bias is not None)
              for name, (n, k) in backbone.linear_modules.items()}
    pointers = torch.zeros(1, dtype=torch.int64, device=device)
    counts = torch.zeros(1, dtype=torch.int32, device=device)
    sparse = SparseArgs(pointers, pointers, counts)
    tallest = max(block_m_choices(dtype))
    for n, k, has_bias in sorted(shapes):
        x = torch.zeros(tallest, k, dtype=dtype, device=device)
        weight = torch.zeros(n, k, dtype=dtype, device=device)
        bias = torch.zeros(n, dtype=dtype, device=device) if has_bias else None
        y = torch.zeros(tallest, n, dtype=dtype, device=device)
        for block_m in block_m_choices(dtype):
            plan = SegmentPlan.build([0], [block_m], device, block_m=block_m)
            rows, out = x[:block_m], y[:block_m]
            for rank in (None, 8, 24):  # no low-rank part, and the two rank chunks (16, 32)
                lora = None
                if rank is not None:
                    lora = LoraExpandArgs(lora_shrink(rows, plan, pointers, counts, rank), pointers, counts)
                for with_sparse in (False, True):
                    part = sparse if with_sparse else None
                    masked_linear(rows, weight, bias, plan, pointers, out, lora=lora, sparse=part)
                    if lora is not None or part is not None:
                        _delta_add(out, plan, rows if part is not None else None, k, lora, part, dtype)
    torch.cuda.synchronize(device)
    return time.perf_counter() - started
