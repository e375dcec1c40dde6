"""The engine's mixed batches against the independent reference, part by part and all at once."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from server.backbone import Backbone
from server.delta import prepare
from server.engine import Engine, Row
from tests.conftest import FAMILIES, make_tiny_model
from tests.factories import ALL_PARTS, make_delta
from tests.reference import ReferenceTask

TEXTS = [
    "a gripping, funny and deeply humane film",
    "dull",
    ("The cat sat on the mat.", "A cat was sitting on a mat."),
    "it is not the worst movie of the year , but it is close to it , and an [UNK] oddity throughout",
    ("Paris is in France", "Berlin"),
    "John Smith flew from New York to Paris on Monday.",
    ("short", "a somewhat longer second sentence that makes this pair the longest input of them all"),
    "ok",
    # tokenizer-inserted tokens only are PASTA slots: an emoji ([UNK]), a typed [MASK] or [SEP] are text
    "a 🤖 delight , truly ✨ - see it .",
    ("typed [MASK] and 🤖", "a [SEP] typed too"),
]


def _engine_and_refs(backbone: Backbone, pristine, deltas):
    engine = Engine(backbone)
    prepared = [prepare(d, backbone, f"task{i}", 1) for i, d in enumerate(deltas)]
    refs = [ReferenceTask(pristine, d) for d in deltas]
    return engine, prepared, refs


def _assert_mixed_batch_matches(backbone, pristine, deltas, seed=0, rows_per_task=3):
    engine, prepared, refs = _engine_and_refs(backbone, pristine, deltas)
    rng = random.Random(seed)
    encoded = backbone.encode(TEXTS)
    assignments = [(t, rng.randrange(len(encoded))) for t in range(len(deltas)) for _ in range(rows_per_task)]
    rng.shuffle(assignments)
    rows = [Row(prepared[t], encoded[i]) for t, i in assignments]
    outputs = engine.forward(rows)
    assert len(outputs) == len(rows)
    for (task, text_index), got in zip(assignments, outputs, strict=True):
        want = refs[task].logits(encoded[text_index])
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    return outputs


@pytest.mark.parametrize("part", [*ALL_PARTS, "head-only"])
def test_each_part_alone_in_a_mixed_batch(tokenizer, part):
    model = make_tiny_model("bert")
    pristine = copy.deepcopy(model)
    backbone = Backbone(model, tokenizer, "tiny", device="cpu")
    parts = () if part == "head-only" else (part,)
    deltas = [make_delta(backbone, parts, seed=s) for s in range(4)]
    deltas.append(make_delta(backbone, (), seed=9))  # a task with no part on any module rides along
    _assert_mixed_batch_matches(backbone, pristine, deltas)


def _mixed_methods(backbone):
    return [
        make_delta(backbone, ("keep",), seed=1, method="mask", zero_fraction=0.05),
        make_delta(backbone, ("pasta",), seed=2, method="pasta"),
        make_delta(backbone, ("low_rank",), seed=3, method="lora"),
        make_delta(backbone, ("keep", "low_rank", "sparse", "head_keep"), seed=4, method="dsee", zero_fraction=0.2),
        make_delta(backbone, ALL_PARTS, seed=5),
        make_delta(backbone, ("low_rank", "pasta"), seed=6, task_type="token-classification",
                   labels=("O", "B-PER", "I-PER", "B-LOC", "I-LOC")),
        make_delta(backbone, ("sparse", "keep"), seed=7, problem_type="regression", labels=("score",)),
        make_delta(backbone, ("low_rank",), seed=8, dtype=torch.float16),
        # few zeros: the mask is applied in place and low-rank/sparse become row corrections
        make_delta(backbone, ("keep", "low_rank", "sparse"), seed=10, zero_fraction=0.03),
    ]


def test_all_parts_and_methods_together(tokenizer):
    model = make_tiny_model("bert")
    pristine = copy.deepcopy(model)
    backbone = Backbone(model, tokenizer, "tiny", device="cpu")
    _assert_mixed_batch_matches(backbone, pristine, _mixed_methods(backbone), seed=1)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_backbone_family(tokenizer, family):
    model = make_tiny_model(family)
    pristine = copy.deepcopy(model)
    backbone = Backbone(model, tokenizer, f"tiny-{family}", device="cpu")
    _assert_mixed_batch_matches(backbone, pristine, _mixed_methods(backbone), seed=2)


def test_backbone_without_pooler_uses_first_token(tokenizer):
    model = make_tiny_model("bert", pooler=False)
    pristine = copy.deepcopy(model)
    backbone = Backbone(model, tokenizer, "tiny", device="cpu")
    assert not backbone.has_pooler
    _assert_mixed_batch_matches(backbone, pristine, _mixed_methods(backbone)[:4], seed=3)


def test_a_row_alone_equals_the_same_row_in_a_mixed_batch(tiny_backbone):
    engine = Engine(tiny_backbone)
    deltas = [prepare(d, tiny_backbone, f"t{i}", 1) for i, d in enumerate(_mixed_methods(tiny_backbone))]
    encoded = tiny_backbone.encode(TEXTS)
    mixed = engine.forward([Row(deltas[i % len(deltas)], encoded[i % len(encoded)]) for i in range(16)])
    for i in range(16):
        alone = engine.forward([Row(deltas[i % len(deltas)], encoded[i % len(encoded)])])[0]
        torch.testing.assert_close(mixed[i], alone, atol=1e-5, rtol=0)


def test_no_plan_left_behind_and_dense_path_untouched(tiny_backbone):
    engine = Engine(tiny_backbone)
    encoded = tiny_backbone.encode(TEXTS[:3])
    before = engine.forward_dense(encoded)
    delta = prepare(make_delta(tiny_backbone, ALL_PARTS), tiny_backbone, "t", 1)
    engine.forward([Row(delta, e) for e in encoded])
    assert all(m.plan is None for m in engine.mixed.values())
    torch.testing.assert_close(engine.forward_dense(encoded), before, atol=0, rtol=0)


def test_mixed_methods_cover_both_keep_mask_paths(tiny_backbone):
    prepared = [prepare(d, tiny_backbone, f"t{i}", 1) for i, d in enumerate(_mixed_methods(tiny_backbone))]
    paths = {parts.keep.in_place for p in prepared for parts in p.modules.values() if parts.keep is not None}
    assert paths == {True, False}
    in_place_with_corrections = [
        parts for p in prepared for parts in p.modules.values()
        if parts.keep is not None and parts.keep.in_place and parts.low_rank is not None and parts.sparse is not None
    ]
    assert in_place_with_corrections


def test_weights_are_untouched_after_mixed_batches(tiny_backbone):
    before = {name: m.weight.clone() for name, m in tiny_backbone.model.named_modules() if hasattr(m, "weight")}
    engine = Engine(tiny_backbone)
    deltas = [prepare(d, tiny_backbone, f"t{i}", 1) for i, d in enumerate(_mixed_methods(tiny_backbone))]
    encoded = tiny_backbone.encode(TEXTS)
    engine.forward([Row(deltas[i % len(deltas)], encoded[i % len(encoded)]) for i in range(24)])
    for name, module in tiny_backbone.model.named_modules():
        if name in before:
            assert torch.equal(module.weight, before[name]), name


def test_a_task_costs_its_delta_not_a_copy(tiny_backbone):
    delta = make_delta(tiny_backbone, ("keep",), zero_fraction=0.05)
    prepared = prepare(delta, tiny_backbone, "t", 1)
    weight_bytes = sum(o * i * 4 for name, (o, i) in tiny_backbone.linear_modules.items() if name in delta.keep)
    assert prepared.nbytes <= delta.nbytes + 64
    assert prepared.nbytes < weight_bytes / 16


@pytest.mark.slow
def test_real_minilm_mixed_batch():
    from transformers import AutoModel

    from server.backbone import packaged_model_path

    backbone = Backbone.load(device="cpu")
    pristine = AutoModel.from_pretrained(packaged_model_path()).eval()
    deltas = [
        make_delta(backbone, ("keep",), seed=1, method="mask", zero_fraction=0.05),
        make_delta(backbone, ("pasta",), seed=2, method="pasta", scale=0.01),
        make_delta(backbone, ("keep", "low_rank", "sparse", "head_keep"), seed=3, zero_fraction=0.2, scale=0.01),
        make_delta(backbone, ("low_rank", "pooler"), seed=4, task_type="sequence-classification", scale=0.01),
    ]
    _assert_mixed_batch_matches(backbone, pristine, deltas, rows_per_task=2)
