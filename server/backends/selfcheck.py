"""A safe start for the Triton backend: warm it up, check it against the torch path, or fall back.

The grouped kernels have been checked in Triton's interpreter and compiled for sm_90 without a
GPU (see docs/gpu.md), which is not the same as running on the GPU at hand with its Triton and
driver. So at start on CUDA, before any request:

1. the kernels are warmed up over every specialisation serving can meet (`triton_ops.warm_up`):
   compiles and autotuning happen here, never under the engine lock while serving;
2. one small mixed batch of synthetic tasks (keep masks, low rank, sparse, bias, LayerNorm and
   embedding deltas, head keep, PASTA, mean pooling, a head-only task; the batch's rows
   interleaved) runs through the Triton backend and through
   the `cpu` backend — the formula in plain torch ops, per task segment — on the same GPU, in the
   same dtype, and the logits are compared.

On an error or a mismatch the reason is logged and the torch path serves (`auto`), or start-up
fails with that reason (`--backend triton`, which asks for the kernels and nothing else). Which
backend serves, and why, is what `/health` and `/memory` report (`BackendChoice`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from adapters_store.format import (
    BiasDelta,
    DeltaMeta,
    EmbeddingShift,
    HeadKeep,
    KeepMask,
    LowRank,
    NormDelta,
    PastaVectors,
    SparseUpdate,
    TaskDelta,
    TaskHead,
)
from adapters_store.packing import pack_bits

log = logging.getLogger("deltaserve")

TEXTS = ["a gripping, funny and moving film", "dull", ("The cat sat on the mat.", "A cat sat."),
         "John Smith flew from Paris to New York on Monday."]
# Both sides in the backbone's dtype on one GPU: fp16 rounding of different summation orders,
# over a handful of layers, on logits of order 1 (docs/gpu.md).
TOLERANCE = {torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 2e-1}


@dataclass(frozen=True)
class BackendChoice:
    """Which engine backend serves, and why (shown by /health and /memory)."""

    name: str
    reason: str


class BackendCheckFailed(RuntimeError):
    """The Triton backend failed its start-up check (an error, or logits off the torch path's)."""


def synthetic_tasks(backbone) -> list[TaskDelta]:
    """Three small tasks that exercise every part the kernels serve and both poolings, for this backbone's
    shapes."""
    gen = torch.Generator().manual_seed(0)
    d = backbone.hidden_size
    modules = sorted(backbone.linear_modules)
    meta = DeltaMeta(method="dsee", task_type="sequence-classification", labels=("a", "b"),
                     backbone_fingerprint=backbone.fingerprint)

    def head() -> TaskHead:
        return TaskHead(torch.randn(2, d, generator=gen) * 0.5, torch.randn(2, generator=gen) * 0.1)

    parts: list = []
    for index, name in enumerate(modules):
        out_f, in_f = backbone.linear_modules[name]
        if index % 2 == 0:
            parts.append(KeepMask(name, (out_f, in_f), pack_bits(torch.rand(out_f, in_f, generator=gen) >= 0.2)))
        if index % 3 == 0:
            parts.append(LowRank(name, torch.randn(8, in_f, generator=gen) * 0.05,
                                 torch.randn(out_f, 8, generator=gen) * 0.05))
        if index % 4 == 1:
            parts.append(SparseUpdate(name, (out_f, in_f), torch.randperm(out_f * in_f, generator=gen)[:16],
                                      torch.randn(16, generator=gen) * 0.05))
        if index % 5 == 2:
            parts.append(BiasDelta(name, torch.randn(out_f, generator=gen) * 0.05))
    keep_heads = torch.ones(backbone.num_heads, dtype=torch.uint8)
    keep_heads[0] = 0
    norms = [NormDelta(name, torch.randn(width, generator=gen) * 0.05, torch.randn(width, generator=gen) * 0.05)
             for name, width in sorted(backbone.layer_norms.items())[::2]]
    shift = None
    if backbone.embedding_norm is not None:
        token_types = (torch.randn(backbone.type_vocab_size, d, generator=gen) * 0.05
                       if backbone.type_vocab_size else None)
        shift = EmbeddingShift(torch.randn(4, d, generator=gen) * 0.05, token_types)
    everything = TaskDelta.from_parts(meta, head(), parts, {0: HeadKeep(0, keep_heads)}, None, norms, shift)
    low_rank = [LowRank(name, torch.randn(4, backbone.linear_modules[name][1], generator=gen) * 0.05,
                        torch.randn(backbone.linear_modules[name][0], 4, generator=gen) * 0.05)
                for name in modules[1::2]]
    mean_pooled = replace(meta, pooling="mean")
    pasta = TaskDelta.from_parts(mean_pooled, head(), low_rank, {},
                                 PastaVectors(torch.randn(backbone.num_layers, 3, d, generator=gen) * 0.1))
    return [everything, pasta, TaskDelta.from_parts(meta, head())]


def compare_with_torch_path(backbone, triton_engine, make_engine) -> str | None:
    """Run the check batch on `triton_engine`, then on a `cpu`-backend engine (`make_engine("cpu")`);
    None when they agree, else what differs. Leaves the Triton backend installed."""
    from server.delta import prepare
    from server.engine import Row

    tasks = synthetic_tasks(backbone)
    encoded = backbone.encode(TEXTS)
    layout = [(task, text) for text in range(len(encoded)) for task in range(len(tasks))]  # interleaved

    def logits(engine, backend: str) -> list[torch.Tensor]:
        prepared = [prepare(task, backbone, f"selfcheck-{i}", 1, backend=backend) for i, task in enumerate(tasks)]
        return engine.forward([Row(prepared[task], encoded[text]) for task, text in layout])

    got = logits(triton_engine, "triton")
    reference_engine = make_engine("cpu")
    try:
        want = logits(reference_engine, "cpu")
    finally:
        reference_engine.detach()
        triton_engine.backend.install()  # the torch path's modules out, the kernels' back in
    tolerance = TOLERANCE.get(backbone.dtype, 5e-2)
    for (task, text), a, b in zip(layout, got, want, strict=True):
        if a.shape != b.shape or not torch.isfinite(a).all():
            return f"task {task}, text {text}: logits {tuple(a.shape)} {a.tolist()} against {tuple(b.shape)}"
        difference = (a.float() - b.float()).abs().max().item()
        if difference > tolerance * (1 + b.float().abs().max().item()):
            return f"task {task}, text {text}: logits differ by {difference:.3g} (tolerance {tolerance:g})"
    return None


def check_triton(backbone, engine, make_engine) -> None:
    """Warm-up and parity check; raises `BackendCheckFailed` with the reason."""
    from server.backends import triton_ops

    try:
        seconds = triton_ops.warm_up(backbone)
        log.info("triton backend: kernels warmed up in %.1f s", seconds)
        problem = compare_with_torch_path(backbone, engine, make_engine)
    except Exception as error:  # any failure of the kernels is a reason not to serve with them
        raise BackendCheckFailed(f"{type(error).__name__}: {error}") from error
    if problem is not None:
        raise BackendCheckFailed(f"logits off the torch path's on the start-up batch: {problem}")
