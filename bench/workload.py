"""Realistic deltas and inputs for benchmarks: each method's parts where its paper puts them.

The deltas are random in value but real in shape, placement and density, so the engine does
exactly the work a trained delta would cost:
- mask:  keep masks on query/key/value/attention output/intermediate/output of layers 2..L-1
         and the pooler, 5 % zeros (Zhao et al.'s default initial sparsity; `mask_zeros` to change);
- pasta: one vector per layer and special-token slot (3 slots);
- lora:  rank 8 on query and value;
- dsee:  rank 8 + 16 sparse positions on query and value, 20 % unstructured pruning as keep
         masks on every linear module (Chen et al.'s defaults);
- mix:   the four methods in turn.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

import torch

from adapters_store.format import DeltaMeta, KeepMask, LowRank, PastaVectors, SparseUpdate, TaskDelta, TaskHead
from adapters_store.packing import pack_bits
from server.backbone import Backbone, EncodedText

METHODS = ("pasta", "lora", "mask", "dsee")
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def mask_modules(backbone: Backbone) -> list[str]:
    layout = backbone.layout
    names = [
        f"{layout.layers}.{layer}.{suffix}"
        for layer in range(2, backbone.num_layers)
        for suffix in (layout.query, layout.key, layout.value, layout.attention_output, layout.ffn_in,
                       layout.ffn_out)
    ]
    return names + [name for name in backbone.linear_modules if name.startswith("pooler.")]


def qv_modules(backbone: Backbone) -> list[str]:
    layout = backbone.layout
    return [f"{layout.layers}.{layer}.{suffix}" for layer in range(backbone.num_layers)
            for suffix in (layout.query, layout.value)]


def make_method_delta(backbone: Backbone, method: str, seed: int, rank: int = 8,
                      mask_zeros: float = 0.05) -> TaskDelta:
    if method == "mix":
        method = METHODS[seed % len(METHODS)]
    gen = torch.Generator().manual_seed(seed)
    d = backbone.hidden_size
    keep, low_rank, sparse = {}, {}, {}
    pasta = None

    def keep_mask(name: str, zero_fraction: float) -> KeepMask:
        shape = backbone.linear_modules[name]
        return KeepMask(name, shape, pack_bits(torch.rand(shape, generator=gen) >= zero_fraction))

    if method == "mask":
        keep = {name: keep_mask(name, mask_zeros) for name in mask_modules(backbone)}
    elif method == "pasta":
        pasta = PastaVectors(torch.randn(backbone.num_layers, 3, d, generator=gen) * 0.1)
    elif method in ("lora", "dsee"):
        for name in qv_modules(backbone):
            out_f, in_f = backbone.linear_modules[name]
            low_rank[name] = LowRank(name, torch.randn(rank, in_f, generator=gen) * 0.01,
                                     torch.randn(out_f, rank, generator=gen) * 0.01)
            if method == "dsee":
                index = torch.randperm(out_f * in_f, generator=gen)[:16]
                sparse[name] = SparseUpdate(name, (out_f, in_f), index, torch.randn(16, generator=gen) * 0.01)
        if method == "dsee":
            keep = {name: keep_mask(name, 0.20) for name in backbone.linear_modules}
    else:
        raise ValueError(f"unknown method {method!r}")
    head = TaskHead(torch.randn(2, d, generator=gen) * 0.05, torch.zeros(2))
    meta = DeltaMeta(method=method, task_type="sequence-classification", labels=("negative", "positive"),
                     backbone_fingerprint=backbone.fingerprint)
    return TaskDelta.from_parts(meta, head, [*keep.values(), *low_rank.values(), *sparse.values()], {}, pasta)


def sentences(count: int, seed: int = 0) -> list[str]:
    """Real sentences (SST-2 train) when the shared data is there, else generated ones."""
    path = DATA / "sst2" / "train.tsv"
    rng = random.Random(seed)
    if path.exists():
        with path.open(newline="") as handle:
            rows = [r["sentence"] for r in csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)]
        return [rng.choice(rows) for _ in range(count)]
    words = ["the", "film", "is", "a", "quietly", "moving", "and", "often", "funny", "story", "of", "love",
             "loss", "and", "small", "town", "life"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 40))) for _ in range(count)]


def texts_of_length(backbone: Backbone, count: int, tokens: int, seed: int = 0) -> list[EncodedText]:
    """`count` inputs of exactly `tokens` tokens (real sentences joined, then truncated)."""
    pool = sentences(count * 8, seed)
    joined = [" ".join(pool[i * 8 : (i + 1) * 8]) for i in range(count)]
    return backbone.encode(joined, max_length=tokens)


def texts_of_exact_length(backbone: Backbone, count: int, tokens: int, seed: int = 0) -> list[EncodedText]:
    """`count` inputs of exactly `tokens` tokens: enough real sentences joined, then truncated.

    `texts_of_length` joins 8 sentences, which falls short of 128 tokens for SST-2's short
    phrases; this joins as many as it takes, so every row of a "long" batch is really long.
    """
    pool = sentences(count * 64, seed)
    joined = []
    for i in range(count):
        parts = pool[i * 64 : (i + 1) * 64]
        text = ""
        for part in parts:
            text = f"{text} {part}".strip()
            if len(text.split()) >= tokens:
                break
        joined.append(text)
    return backbone.encode(joined, max_length=tokens)
