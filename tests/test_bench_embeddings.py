"""The embeddings benchmark's functions on a tiny model: every side runs and the section renders.

Nothing here asserts on speed; the bare backbone against sentence-transformers is tests/test_pooling.py's.
"""

from __future__ import annotations

from bench import embeddings
from server.delta import prepare
from server.engine import Engine, Row
from tests.conftest import make_tiny_backbone


def test_embedding_benchmark_runs_every_side(tokenizer):
    backbone = make_tiny_backbone(tokenizer)
    result = embeddings.run(rows=6, rounds=2, backbone=backbone, anchor=False)
    assert set(result.seconds) == {"dense", "bare backbone", "embed + classify (LoRA)",
                                   "embed + classify (four methods)"}
    assert all(s > 0 for s in result.seconds.values()) and result.padded >= result.tokens
    text = embeddings.section(result)
    assert "| bare backbone |" in text and "× dense" in text and result.uptime in text


def test_embedding_tasks_of_the_benchmark_are_real_embeddings(tokenizer):
    backbone = make_tiny_backbone(tokenizer)
    delta = prepare(embeddings.embedding_delta(backbone, "lora", 1, 8), backbone, "e", 1)
    vector = Engine(backbone).forward([Row(delta, backbone.encode(["a film"])[0])])[0]
    assert vector.shape == (8,) and abs(float(vector.norm()) - 1) < 1e-5
