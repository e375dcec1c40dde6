"""The CPU backend's built-weight cache: exact against the reference, bounded, freed with its task."""

from __future__ import annotations

import copy
import gc

import torch

from server.backbone import Backbone
from server.delta import prepare
from server.engine import Engine, Row
from tests.conftest import make_tiny_model
from tests.factories import make_delta
from tests.reference import ReferenceTask

TEXTS = ["a gripping, funny and deeply humane film", "dull", ("The cat sat.", "A cat was sitting."),
         "it is not the worst movie of the year , but it is close"]


def test_built_weights_are_exact_bounded_and_freed_with_their_task(tokenizer):
    model = make_tiny_model("bert")
    pristine = copy.deepcopy(model)
    backbone = Backbone(model, tokenizer, "tiny", device="cpu")
    engine = Engine(backbone)
    built = engine.backend.built
    deltas = [make_delta(backbone, ("keep", "low_rank", "sparse"), seed=s, zero_fraction=0.3) for s in range(3)]
    deltas.append(make_delta(backbone, ("keep",), seed=7, zero_fraction=0.03))  # few zeros: in place, never built
    prepared = [prepare(d, backbone, f"t{i}", 1) for i, d in enumerate(deltas)]
    refs = [ReferenceTask(pristine, d) for d in deltas]
    encoded = backbone.encode(TEXTS)
    rows = [Row(prepared[i % 4], encoded[i % len(encoded)]) for i in range(12)]

    def check(outputs):
        for i, got in enumerate(outputs):
            torch.testing.assert_close(got, refs[i % 4].logits(encoded[i % len(encoded)]), atol=1e-5, rtol=0)

    weight_bytes = {name: m.weight.numel() * 4 for name, m in engine.mixed.items()}
    one_task = sum(weight_bytes[name] for name in prepared[0].modules if prepared[0].modules[name].keep)
    built.budget_bytes = 2 * one_task + one_task // 2  # room for two tasks' weights, not three
    first = engine.forward(rows)  # builds (and keeps what fits)
    check(first)
    assert 0 < built.nbytes <= built.budget_bytes
    kept = len(built)
    second = engine.forward(rows)  # reads the kept ones, builds the rest in scratch as before
    check(second)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert len(built) == kept  # nothing evicted, nothing more admitted

    built.budget_bytes = 0
    del rows, first, second, prepared
    gc.collect()
    assert len(built) == 0 and built.nbytes == 0  # the tasks are gone: so are their built weights
