"""Build task-delta files for tests, straight from the spec's keys (no trainer involved).

`build_delta` writes any mix of parts for a given backbone; `extra`/`drop`/`metadata`
let a test break one rule at a time.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

import torch
from safetensors.torch import save as st_save

from adapters_store.packing import pack_bits
from server.backbone import Backbone

ALL_PARTS = ("keep", "lora", "sparse", "bias", "head_keep", "pasta")


def build_delta(
    backbone: Backbone,
    *,
    parts: Iterable[str] = ("lora",),
    task_type: str = "sequence-classification",
    labels: Iterable[str] = ("negative", "positive"),
    method: str = "dsee",
    problem_type: str | None = None,
    pooler_head: bool = False,
    max_length: int | None = None,
    word_piece: str | None = None,
    description: str = "",
    seed: int = 0,
    extra: Mapping[str, torch.Tensor] | None = None,
    drop: Iterable[str] = (),
    metadata: Mapping[str, str] | None = None,
    projection: int | None = None,
) -> bytes:
    """`task_type="embedding"`: no classifier, labels `[]`; `projection` = D adds head.projection.*."""
    embedding = task_type == "embedding"
    labels = [] if embedding else list(labels)
    gen = torch.Generator().manual_seed(seed)
    d, layers = backbone.hidden_size, backbone.num_layers
    layout = backbone.layout
    tensors: dict[str, torch.Tensor] = {} if embedding else {
        "head.classifier.weight": torch.randn(len(labels), d, generator=gen),
        "head.classifier.bias": torch.randn(len(labels), generator=gen) * 0.1,
    }
    if projection:
        tensors["head.projection.weight"] = torch.randn(projection, d, generator=gen) * 0.2
        tensors["head.projection.bias"] = torch.randn(projection, generator=gen) * 0.1
    if pooler_head:
        tensors["head.pooler.weight"] = torch.randn(d, d, generator=gen) * 0.2
        tensors["head.pooler.bias"] = torch.randn(d, generator=gen) * 0.1

    def module(layer: int, part: str) -> tuple[str, tuple[int, int]]:
        name = f"{layout.layers}.{layer}.{part}"
        return name, backbone.linear_modules[name]

    parts = set(parts)
    for layer in range(layers):
        if "keep" in parts:
            name, (out, inp) = module(layer, layout.ffn_in)
            tensors[f"{name}.keep"] = pack_bits(torch.rand(out, inp, generator=gen) > 0.3)
        if "lora" in parts:
            for part in (layout.query, layout.value):
                name, (out, inp) = module(layer, part)
                tensors[f"{name}.lora_A"] = torch.randn(2, inp, generator=gen) * 0.5
                tensors[f"{name}.lora_B"] = torch.randn(out, 2, generator=gen) * 0.5
        if "sparse" in parts:
            name, (out, inp) = module(layer, layout.ffn_out)
            k = min(40, out * inp)
            tensors[f"{name}.sparse_index"] = torch.randperm(out * inp, generator=gen)[:k].to(torch.int64)
            tensors[f"{name}.sparse_value"] = torch.randn(k, generator=gen)
        if "bias" in parts:
            for part in (layout.ffn_in, layout.attention_output):
                name, (out, _) = module(layer, part)
                tensors[f"{name}.bias_delta"] = torch.randn(out, generator=gen) * 0.5
    if "norms" in parts:  # every layer's last LayerNorm; the embedding shift over the first 6 positions
        for layer in range(layers):
            name = f"{layout.layers}.{layer}.output.LayerNorm"
            if name in backbone.layer_norms:
                tensors[f"{name}.norm_weight_delta"] = torch.randn(d, generator=gen) * 0.2
                tensors[f"{name}.norm_bias_delta"] = torch.randn(d, generator=gen) * 0.2
        tensors["embeddings.position_delta"] = torch.randn(6, d, generator=gen) * 0.5
        if backbone.type_vocab_size:
            tensors["embeddings.token_type_delta"] = torch.randn(backbone.type_vocab_size, d, generator=gen) * 0.5
    if "head_keep" in parts:
        keep = torch.ones(backbone.num_heads, dtype=torch.uint8)
        keep[1] = 0
        tensors["layers.1.head_keep"] = keep
    if "pasta" in parts:
        tensors["pasta.vectors"] = torch.randn(layers, 3, d, generator=gen)
    tensors.update(extra or {})
    for key in drop:
        tensors.pop(key, None)

    meta = {
        "format": "task-delta/1",
        "method": method,
        "task_type": task_type,
        "labels": json.dumps(labels),
        "backbone_fingerprint": backbone.fingerprint,
    }
    if problem_type:
        meta["problem_type"] = problem_type
    if max_length:
        meta["max_length"] = str(max_length)
    if word_piece:
        meta["word_piece"] = word_piece
    if description:
        meta["description"] = description
    meta.update(metadata or {})
    return st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta)


NER_LABELS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")
