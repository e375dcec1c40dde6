"""Random but valid task deltas for tests: any mix of parts on any backbone."""

from __future__ import annotations

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
from server.backbone import Backbone

ALL_PARTS = ("keep", "low_rank", "sparse", "bias", "norms", "head_keep", "pasta", "pooler")


def make_delta(
    backbone: Backbone,
    parts: tuple[str, ...] = (),
    *,
    seed: int = 0,
    labels: tuple[str, ...] = ("negative", "positive"),
    task_type: str = "sequence-classification",
    problem_type: str = "single_label",
    method: str = "dsee",
    zero_fraction: float = 0.1,
    rank: int = 4,
    dtype: torch.dtype = torch.float32,
    modules: list[str] | None = None,
    scale: float = 0.05,
    pooling: str | None = None,
    normalize: bool = True,
    projection: int | None = None,
) -> TaskDelta:
    """`task_type="embedding"` has no classifier: `projection` = D adds head.projection.* [D, d]."""
    gen = torch.Generator().manual_seed(seed)
    d = backbone.hidden_size
    parts_wanted = parts

    def randn(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    targets = modules if modules is not None else [
        name for i, name in enumerate(sorted(backbone.linear_modules)) if (i + seed) % 2 == 0
    ]
    keep, low_rank, sparse, bias, head_keep = {}, {}, {}, {}, {}
    for name in targets:
        out_f, in_f = backbone.linear_modules[name]
        if "keep" in parts:
            mask = torch.rand(out_f, in_f, generator=gen) >= zero_fraction
            keep[name] = KeepMask(name, (out_f, in_f), pack_bits(mask))
        if "low_rank" in parts:
            low_rank[name] = LowRank(name, randn(rank, in_f), randn(out_f, rank))
        if "sparse" in parts:
            index = torch.randperm(out_f * in_f, generator=gen)[:16].to(torch.int64)
            sparse[name] = SparseUpdate(name, (out_f, in_f), index, randn(16) * 10)
        if "bias" in parts:
            bias[name] = BiasDelta(name, randn(out_f) * 10)
    if "head_keep" in parts:
        for layer in range(backbone.num_layers):
            if (layer + seed) % 2 == 0:
                keep_heads = torch.ones(backbone.num_heads, dtype=torch.uint8)
                keep_heads[(layer + seed) % backbone.num_heads] = 0
                head_keep[layer] = HeadKeep(layer, keep_heads)
    pasta = PastaVectors(randn(backbone.num_layers, 3, d) * 20) if "pasta" in parts else None
    num_classes = 1 if problem_type == "regression" else len(labels)
    embedding = task_type == "embedding"
    if embedding:
        labels = ()
    head = TaskHead(
        None if embedding else randn(num_classes, d) * 20,
        None if embedding else randn(num_classes),
        randn(d, d) * 20 if "pooler" in parts else None,
        randn(d) if "pooler" in parts else None,
        randn(projection, d) * 20 if projection else None,
        randn(projection) if projection else None,
    )
    meta = DeltaMeta(
        method=method,
        task_type=task_type,  # type: ignore[arg-type]
        labels=labels,
        backbone_fingerprint=backbone.fingerprint,
        problem_type=problem_type,
        pooling=pooling,
        normalize=normalize,
    )
    parts = [*keep.values(), *low_rank.values(), *sparse.values(), *bias.values()]
    norms, shift = [], None
    if "norms" in parts_wanted:  # every other LayerNorm, and the embedding shift over a few positions
        norms = [NormDelta(name, randn(width) * 10, randn(width) * 10 if i % 3 else None)
                 for i, (name, width) in enumerate(sorted(backbone.layer_norms.items())) if (i + seed) % 2 == 0]
        types = randn(backbone.type_vocab_size, d) * 10 if backbone.type_vocab_size else None
        shift = EmbeddingShift(randn(5, d) * 10, types)
    return TaskDelta.from_parts(meta, head, parts, head_keep, pasta, norms, shift)
