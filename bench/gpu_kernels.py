"""Kernel-level GPU microbenchmark: the grouped Triton kernels against dense `F.linear` and a per-segment loop.

    python -m bench.gpu_kernels                 # on a CUDA machine: MiniLM and MPNet-base shapes, k = 1…256
    python -m bench.gpu_kernels --check         # anywhere: tiny shapes, one run each, outputs compared

For each linear shape of a layer (`[d, d]` attention, `[4d, d]` FFN in, `[d, 4d]` FFN out) and a
batch of `tokens` rows split evenly into k task segments, it times one module's work for one
batch, every side on the same rows and the same device-resident deltas:

- `dense`: `F.linear(x, W, b)` on every row, no delta — the ceiling;
- `loop`: a per-segment torch loop, as the CPU engine does it (unpack the task's bits into
  `W ⊙ K`, `F.linear`, two LoRA GEMMs, an `index_add_`), one set of launches per task;
- `grouped`: `lora_shrink` + `masked_linear` with the expand and the sparse part folded into its
  epilogue — the launches a module costs in the Triton backend;
- `unfused`: `lora_shrink` + `masked_linear` + `lora_expand` + `sparse_add`, to measure the fold.

Methods: `plain` (no delta: the grouped kernel's overhead against cuBLAS), `mask` (5 % zeros),
`lora` (rank 8), `dsee` (20 % zeros, rank 8, 16 sparse entries). Before timing, every side's
output is compared with the `loop`'s (the plain torch computation). Timings: CUDA events around
`iters` back-to-back calls after warm-up (triton.testing.do_bench), medians, ratios against
`dense` of the same run. Nothing here asserts on speed.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from server.backends import triton_ops as ops

MODELS = {"minilm": 384, "mpnet-base": 768}
METHODS = ("plain", "mask", "lora", "dsee")
RANK = 8
SPARSE_ENTRIES = 16


@dataclass
class TaskDelta:
    """One task's parts for one module, resident on the device (packed mask stays packed)."""

    keep: torch.Tensor | None  # bool [N, K], for the loop (a real engine keeps only `packed`)
    packed: torch.Tensor | None  # uint8 [ceil(N K / 8)]
    lora_A: torch.Tensor | None
    lora_B: torch.Tensor | None
    sparse_index: torch.Tensor | None  # sorted flat int64
    sparse_value: torch.Tensor | None


def pack_bits_torch(keep: torch.Tensor) -> torch.Tensor:
    """task-delta.md's packing on the device: row-major bits, most significant first, pad 0."""
    flat = keep.reshape(-1).to(torch.uint8)
    flat = F.pad(flat, (0, (-flat.numel()) % 8))
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=keep.device)
    return (flat.view(-1, 8) * weights).sum(1, dtype=torch.int32).to(torch.uint8)


def unpack_bits_torch(packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    shifts = torch.arange(7, -1, -1, device=packed.device, dtype=torch.uint8)
    bits = (packed[:, None] >> shifts) & 1
    return bits.reshape(-1)[: shape[0] * shape[1]].view(shape)


def make_delta(method: str, n: int, k: int, dtype: torch.dtype, device: str, gen: torch.Generator) -> TaskDelta:
    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    zeros = {"mask": 0.05, "dsee": 0.20}.get(method)
    keep = (torch.rand(n, k, generator=gen) >= zeros).to(device) if zeros else None
    low_rank = method in ("lora", "dsee")
    sparse = method == "dsee"
    index = value = None
    if sparse:
        flat = torch.randperm(n * k, generator=gen)[:SPARSE_ENTRIES].to(device)
        index, value = ops.sort_support(flat, rand(SPARSE_ENTRIES, scale=0.01))
    return TaskDelta(
        keep=keep,
        packed=pack_bits_torch(keep) if keep is not None else None,
        lora_A=rand(RANK, k, scale=k ** -0.5) if low_rank else None,
        lora_B=rand(n, RANK, scale=0.01) if low_rank else None,
        sparse_index=index,
        sparse_value=value,
    )


@dataclass
class Case:
    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    starts: list[int]
    ends: list[int]
    deltas: list[TaskDelta]

    def run_dense(self) -> torch.Tensor:
        return F.linear(self.x, self.weight, self.bias)

    def run_loop(self) -> torch.Tensor:
        """Per segment, plain torch; the reference every other side is checked against."""
        y = torch.empty(self.x.shape[0], self.weight.shape[0], device=self.x.device, dtype=self.x.dtype)
        for lo, hi, d in zip(self.starts, self.ends, self.deltas, strict=True):
            x = self.x[lo:hi]
            weight = self.weight
            if d.packed is not None:
                weight = weight * unpack_bits_torch(d.packed, tuple(weight.shape)).to(weight.dtype)
            out = F.linear(x, weight, self.bias)
            if d.lora_A is not None:
                out += (x @ d.lora_A.T) @ d.lora_B.T
            if d.sparse_index is not None:
                k = self.weight.shape[1]
                out.index_add_(1, d.sparse_index // k, x[:, d.sparse_index % k] * d.sparse_value)
            y[lo:hi] = out
        return y


class Grouped:
    """The per-batch tables of the Triton backend for one module, built once outside the timing."""

    def __init__(self, case: Case) -> None:
        device = case.x.device
        ds = case.deltas
        self.case = case
        self.plan = ops.SegmentPlan.build(case.starts, case.ends, device)
        self.mask_ptrs = ops.pointer_table([d.packed for d in ds], device)
        self.ranks = torch.tensor([0 if d.lora_A is None else d.lora_A.shape[0] for d in ds],
                                  dtype=torch.int32, device=device)
        self.max_rank = int(self.ranks.max()) if ds else 0
        self.a_ptrs = ops.pointer_table([d.lora_A for d in ds], device)
        self.b_ptrs = ops.pointer_table([d.lora_B for d in ds], device)
        has_sparse = any(d.sparse_index is not None for d in ds)
        self.sparse = ops.SparseArgs(
            ops.pointer_table([d.sparse_index for d in ds], device),
            ops.pointer_table([d.sparse_value for d in ds], device),
            torch.tensor([0 if d.sparse_index is None else d.sparse_index.numel() for d in ds],
                         dtype=torch.int32, device=device),
        ) if has_sparse else None

    def run(self, fused: bool = True) -> torch.Tensor:
        c = self.case
        lora = None
        if self.max_rank:
            t = ops.lora_shrink(c.x, self.plan, self.a_ptrs, self.ranks, self.max_rank)
            lora = ops.LoraExpandArgs(t, self.b_ptrs, self.ranks)
        if fused:
            return ops.masked_linear(c.x, c.weight, c.bias, self.plan, self.mask_ptrs, lora=lora, sparse=self.sparse)
        y = ops.masked_linear(c.x, c.weight, c.bias, self.plan, self.mask_ptrs)
        if lora is not None:
            ops.lora_expand(lora.t, self.plan, lora.b_ptrs, lora.ranks, y)
        if self.sparse is not None:
            ops.sparse_add(c.x, y, self.sparse, self.plan)
        return y


def make_case(tokens: int, k_tasks: int, n: int, k: int, method: str, dtype: torch.dtype, device: str,
              seed: int = 0) -> Case:
    gen = torch.Generator().manual_seed(seed)
    bounds = [round(i * tokens / k_tasks) for i in range(k_tasks + 1)]
    x = torch.randn(tokens, k, generator=gen).to(device=device, dtype=dtype)
    weight = (torch.randn(n, k, generator=gen) * k ** -0.5).to(device=device, dtype=dtype)
    bias = (torch.randn(n, generator=gen) * 0.02).to(device=device, dtype=dtype)
    deltas = [make_delta(method, n, k, dtype, device, gen) for _ in range(k_tasks)]
    return Case(x, weight, bias, bounds[:-1], bounds[1:], deltas)


def timer(device: str, iters: int) -> Callable[[Callable[[], object]], float]:
    """Median milliseconds of one call."""
    if device == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=max(iters // 4, 5), rep=iters, return_mode="median")

    def cpu_time(fn: Callable[[], object]) -> float:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    return cpu_time


def run(models: dict[str, int], tokens: int, ks: list[int], methods: list[str], dtype: torch.dtype, device: str,
        iters: int) -> list[dict]:
    measure = timer(device, iters)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    results = []
    for model, d in models.items():
        for shape_name, (n, k) in {"attn": (d, d), "ffn_in": (4 * d, d), "ffn_out": (d, 4 * d)}.items():
            for method in methods:
                for k_tasks in ks:
                    case = make_case(tokens, k_tasks, n, k, method, dtype, device)
                    grouped = Grouped(case)
                    sides = {"dense": case.run_dense, "loop": case.run_loop, "grouped": grouped.run,
                             "unfused": lambda g=grouped: g.run(fused=False)}
                    reference = case.run_loop().float()
                    for name in ("grouped", "unfused"):
                        error = (sides[name]().float() - reference).abs().max().item()
                        scale = reference.abs().max().item()
                        if error > tol * max(scale, 1.0):
                            raise AssertionError(f"{model} {shape_name} {method} k={k_tasks} {name}: "
                                                 f"max error {error:.3g} (scale {scale:.3g})")
                    ms = {name: measure(fn) for name, fn in sides.items()}
                    row = {"model": model, "shape": shape_name, "N": n, "K": k, "method": method, "k": k_tasks,
                           "tokens": tokens, "block_m": grouped.plan.block_m, **{f"{s}_ms": v for s, v in ms.items()},
                           "grouped_vs_dense": ms["dense"] / ms["grouped"],
                           "grouped_vs_loop": ms["loop"] / ms["grouped"],
                           "fused_vs_unfused": ms["unfused"] / ms["grouped"]}
                    results.append(row)
                    print(f"{model:10s} {shape_name:7s} {method:5s} k={k_tasks:<3d} dense {ms['dense']:.3f} ms  "
                          f"grouped {ms['grouped']:.3f} ({row['grouped_vs_dense']:.2f}× dense, "
                          f"{row['grouped_vs_loop']:.1f}× loop)  unfused {ms['unfused']:.3f}  loop {ms['loop']:.3f}",
                          flush=True)
    return results


def environment(device: str) -> dict:
    import triton

    info = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "interpreter": ops.INTERPRET}
    if device == "cuda":
        info |= {"device": torch.cuda.get_device_name(), "cuda": torch.version.cuda}
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="tiny shapes, one run each, outputs compared (runs without a GPU, in the interpreter)")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    parser.add_argument("--tokens", type=int, default=64 * 128)
    parser.add_argument("--ks", default="1,16,64,256")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--iters", type=int, default=100, help="milliseconds of repetitions per timing (CUDA)")
    parser.add_argument("--json", help="write the rows and the environment to this file")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    methods = args.methods.split(",")
    if args.check:
        device = "cuda" if not ops.INTERPRET else "cpu"
        models, tokens, ks = {"tiny": 8}, 24, [1, 3, 7]
    else:
        if ops.INTERPRET:
            raise SystemExit("no CUDA device: the kernels would run in Triton's interpreter; use --check")
        device, models, tokens, ks = "cuda", MODELS, args.tokens, [int(k) for k in args.ks.split(",")]
    env = environment(device)
    print(json.dumps(env))
    rows = run(models, tokens, ks, methods, dtype, device, args.iters)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
