"""Mean pooling and the embedding task type (task-delta.md, Head) in every backend, against the reference.

The reference (`tests/reference.py`) runs each text alone with its effective weights written into
a private model copy and takes the plain mean over the lone text's positions; the engine pools
padded, mixed, task-sorted batches. Triton runs in its interpreter on CPU when there is no GPU.
"""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch

from adapters_store.format import InvalidDelta, parse_delta
from server.backbone import Backbone
from server.delta import prepare
from server.engine import Engine, Row
from server.pooling import mean_pool, row_mask, sentence_transformers_config
from tests.conftest import FAMILIES, make_tiny_model
from tests.delta_builders import build_delta
from tests.factories import make_delta
from tests.reference import ReferenceTask

TEXTS = [
    "a gripping, funny and deeply humane film",
    "dull",
    ("The cat sat on the mat.", "A cat was sitting on a mat."),
    ("short", "a somewhat longer second sentence that makes this pair the longest input of them all"),
    "ok",
    "a 🤖 delight , truly ✨ - see it .",
]
# Embedding deltas against the reference (issue 21's target); classification as tight as test_engine's.
EMBEDDING_TOLERANCE = 2e-4


def _pooling_tasks(backbone: Backbone):
    """Mean-pooled classifiers and embeddings of every kind, riding with cls-pooled tasks."""
    return [
        make_delta(backbone, ("low_rank",), seed=1, pooling="mean"),
        make_delta(backbone, ("keep", "pooler"), seed=2, pooling="mean", zero_fraction=0.05),
        make_delta(backbone, ("pasta",), seed=3, pooling="mean", problem_type="regression", labels=("score",)),
        make_delta(backbone, ("low_rank", "pooler"), seed=4),  # cls with its own pooler
        make_delta(backbone, ("sparse",), seed=5),  # cls through the backbone's pooler
        make_delta(backbone, ("keep", "low_rank", "sparse", "head_keep"), seed=6, task_type="embedding",
                   zero_fraction=0.2),
        make_delta(backbone, ("pasta", "low_rank"), seed=7, task_type="embedding", projection=7),
        make_delta(backbone, ("low_rank",), seed=8, task_type="embedding", pooling="cls", normalize=False),
        make_delta(backbone, ("keep",), seed=9, task_type="embedding", normalize=False, projection=5,
                   zero_fraction=0.03),
        make_delta(backbone, (), seed=10, task_type="embedding"),  # the bare backbone, as a delta
        make_delta(backbone, ("low_rank", "pasta"), seed=11, task_type="token-classification",
                   labels=("O", "B-PER", "I-PER")),
    ]


def _check(backbone: Backbone, pristine, deltas, tolerance: float, seed: int = 0, rows_per_task: int = 2):
    engine = Engine(backbone)
    prepared = [prepare(d, backbone, f"task{i}", 1) for i, d in enumerate(deltas)]
    refs = [ReferenceTask(pristine, d) for d in deltas]
    rng = random.Random(seed)
    encoded = backbone.encode(TEXTS)
    assignments = [(t, rng.randrange(len(encoded))) for t in range(len(deltas)) for _ in range(rows_per_task)]
    # every text of every embedding task at least once: the pairs and the longest row are padded least/most
    assignments += [(t, i) for t, d in enumerate(deltas) if d.meta.is_embedding for i in range(len(encoded))]
    rng.shuffle(assignments)
    outputs = engine.forward([Row(prepared[t], encoded[i]) for t, i in assignments])
    for (task, text), got in zip(assignments, outputs, strict=True):
        want = refs[task].logits(encoded[text])
        assert got.shape == want.shape, deltas[task].meta
        assert got.dtype == torch.float32
        tol = EMBEDDING_TOLERANCE if deltas[task].meta.is_embedding else tolerance
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
        if deltas[task].meta.is_embedding and deltas[task].meta.normalize:
            assert abs(float(got.norm()) - 1.0) < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_cpu_backend_mean_pooling_and_embeddings_match_reference(tokenizer, family):
    model = make_tiny_model(family)
    pristine = copy.deepcopy(model)
    backbone = Backbone(model, tokenizer, "tiny", device="cpu")
    _check(backbone, pristine, _pooling_tasks(backbone), 1e-5)


def test_mean_pooling_without_a_backbone_pooler(tokenizer):
    model = make_tiny_model("bert", pooler=False)
    backbone = Backbone(model, tokenizer, "tiny", device="cpu")
    _check(backbone, copy.deepcopy(model), _pooling_tasks(backbone)[:6], 1e-5, seed=3)


def test_mean_pooling_ignores_the_backbone_pooler(tiny_backbone):
    """With mean pooling and no pooler of its own, z is the mean itself, whatever the backbone's pooler."""
    delta = make_delta(tiny_backbone, (), pooling="mean")
    prepared = prepare(delta, tiny_backbone, "t", 1)
    encoded = tiny_backbone.encode(TEXTS[:3])
    logits = Engine(tiny_backbone).forward([Row(prepared, e) for e in encoded])
    for text, got in zip(encoded, logits, strict=True):
        hidden = tiny_backbone.model(input_ids=torch.tensor([text.input_ids]),
                                     token_type_ids=torch.tensor([text.token_type_ids])).last_hidden_state
        want = torch.nn.functional.linear(hidden[0].mean(0), delta.head.classifier_weight, delta.head.classifier_bias)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_mean_pool_leaves_padding_out():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    mask = row_mask([4, 2], 4, "cpu")
    pooled = mean_pool(hidden, mask)
    torch.testing.assert_close(pooled[0], hidden[0].mean(0))
    torch.testing.assert_close(pooled[1], hidden[1, :2].mean(0))


def test_embedding_row_alone_equals_row_in_mixed_batch(tiny_backbone):
    engine = Engine(tiny_backbone)
    deltas = [prepare(d, tiny_backbone, f"t{i}", 1) for i, d in enumerate(_pooling_tasks(tiny_backbone))]
    encoded = tiny_backbone.encode(TEXTS)
    rows = [Row(deltas[i % len(deltas)], encoded[i % len(encoded)]) for i in range(22)]
    mixed = engine.forward(rows)
    for row, got in zip(rows, mixed, strict=True):
        torch.testing.assert_close(got, engine.forward([row])[0], atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- Triton (interpreter on CPU)


@pytest.fixture
def triton_backbone(tokenizer, monkeypatch):
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    from server.backends import triton_ops

    if triton_ops.INTERPRET:  # bigger tiles: the interpreter runs each program in Python
        monkeypatch.setattr(triton_ops, "_INTERPRET_TILES", {"BLOCK_N": 32, "BLOCK_K": 32})
        monkeypatch.setattr(triton_ops, "BLOCK_M_CHOICES", (4, 8, 16))
    model = make_tiny_model("bert")
    pristine = copy.deepcopy(model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return Backbone(model, tokenizer, "tiny", device=device, dtype=torch.float32, backend="triton"), pristine


def test_triton_backend_mean_pooling_and_embeddings_match_reference(triton_backbone):
    backbone, pristine = triton_backbone
    assert Engine(backbone).backend.name == "triton"
    _check(backbone, pristine, _pooling_tasks(backbone), 1e-4, seed=1, rows_per_task=1)


# --------------------------------------------------------------------------- the format


def _meta_of(data: bytes) -> dict[str, str]:
    header = json.loads(data[8: 8 + int.from_bytes(data[:8], "little")])
    return header["__metadata__"]


def test_pooling_and_embedding_metadata_parse_and_round_trip(tiny_backbone):
    spec = tiny_backbone.spec()
    mean = parse_delta(build_delta(tiny_backbone, metadata={"pooling": "mean"}), spec)
    assert mean.meta.pooling == "mean" and mean.meta.mean_pooling
    assert parse_delta(build_delta(tiny_backbone), spec).meta.pooling == "cls"
    embedding = parse_delta(build_delta(tiny_backbone, task_type="embedding", projection=16), spec)
    assert embedding.meta.pooling == "mean" and embedding.meta.normalize and embedding.meta.labels == ()
    assert embedding.head.classifier_weight is None and embedding.head.output_size(32) == 16
    raw = build_delta(tiny_backbone, task_type="embedding", metadata={"pooling": "cls", "normalize": "false"})
    cls_raw = parse_delta(raw, spec)
    assert (cls_raw.meta.pooling, cls_raw.meta.normalize) == ("cls", False)
    again = parse_delta(cls_raw.to_bytes(), spec)
    assert (again.meta.pooling, again.meta.normalize) == ("cls", False)
    assert _meta_of(mean.to_bytes())["pooling"] == "mean"
    assert "pooling" not in _meta_of(parse_delta(build_delta(tiny_backbone), spec).to_bytes())


@pytest.mark.parametrize(("kwargs", "key"), [
    (dict(metadata={"pooling": "max"}), "pooling"),
    (dict(metadata={"pooling": "mean"}, task_type="token-classification"), "pooling"),
    (dict(metadata={"normalize": "false"}), "normalize"),
    (dict(task_type="embedding", metadata={"normalize": "no"}), "normalize"),
    (dict(task_type="embedding", metadata={"labels": '["a"]'}), "labels"),
    (dict(metadata={"labels": "[]"}), "labels"),
    (dict(task_type="embedding", extra={"head.classifier.weight": torch.zeros(1, 32),
                                        "head.classifier.bias": torch.zeros(1)}), "head.classifier.weight"),
    (dict(task_type="embedding", pooler_head=True), "head.pooler.weight"),
    (dict(task_type="embedding", projection=4, drop=["head.projection.bias"]), "head.projection.bias"),
    (dict(task_type="embedding", extra={"head.projection.weight": torch.zeros(4, 31),
                                        "head.projection.bias": torch.zeros(4)}), "head.projection.weight"),
    (dict(task_type="embedding", extra={"head.projection.weight": torch.zeros(4, 32),
                                        "head.projection.bias": torch.zeros(5)}), "head.projection.bias"),
    (dict(extra={"head.projection.weight": torch.zeros(4, 32), "head.projection.bias": torch.zeros(4)}),
     "head.projection.weight"),
    (dict(task_type="embedding", extra={"head.projection.weight": torch.full((4, 32), float("nan")),
                                        "head.projection.bias": torch.zeros(4)}), "head.projection.weight"),
])
def test_bad_pooling_and_embedding_deltas_are_refused_naming_the_key(tiny_backbone, kwargs, key):
    with pytest.raises(InvalidDelta) as caught:
        parse_delta(build_delta(tiny_backbone, **kwargs), tiny_backbone.spec())
    assert caught.value.key == key


# --------------------------------------------------------------------------- the backbone's own pooling


def test_sentence_transformers_config_of_the_packaged_minilm():
    from server.backbone import packaged_model_path

    config = sentence_transformers_config(packaged_model_path())
    assert config is not None
    assert (config.pooling, config.normalize, config.max_seq_length) == ("mean", True, 256)


def test_sentence_transformers_config_of_other_folders(tmp_path):
    assert sentence_transformers_config(tmp_path) is None  # a plain Hugging Face folder
    assert sentence_transformers_config(tmp_path / "missing") is None
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    config = sentence_transformers_config(tmp_path)
    assert config is not None and (config.pooling, config.normalize) == ("cls", False)
    pooled = tmp_path / "pool"
    pooled.mkdir()
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 1, "name": "1", "path": "pool", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (pooled / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    config = sentence_transformers_config(tmp_path)
    assert config is not None and (config.pooling, config.pooling_mode, config.normalize) == (None, "max", True)



def test_inspect_shows_the_resolved_pooling_and_the_head(tiny_backbone, tmp_path, capsys):
    from server.cli import main

    cases = {
        "cls": (build_delta(tiny_backbone), {"task_type": "sequence-classification", "pooling": "cls",
                                             "classifier": [2, 32]}),
        "mean": (build_delta(tiny_backbone, metadata={"pooling": "mean"}, pooler_head=True),
                 {"task_type": "sequence-classification", "pooling": "mean", "classifier": [2, 32],
                  "own_pooler": True}),
        "emb": (build_delta(tiny_backbone, task_type="embedding", projection=8, metadata={"normalize": "false"}),
                {"task_type": "embedding", "pooling": "mean", "normalize": False, "projection": [8, 32]}),
    }
    for name, (data, want) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        assert main(["inspect", str(path), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["head"] == want
    assert main(["inspect", str(tmp_path / "emb.safetensors")]) == 0
    assert "pooling mean, normalize False, projection [8, 32]" in capsys.readouterr().out


def test_the_packaged_backbone_is_named_as_its_model_wherever_it_is_loaded_from():
    from server.backbone import PACKAGED_MODEL_NAME, packaged_model_path
    from server.backbone.model import _display_name

    assert PACKAGED_MODEL_NAME == "all-MiniLM-L6-v2"
    assert _display_name(packaged_model_path()) == PACKAGED_MODEL_NAME
    assert _display_name(packaged_model_path() + "/") == PACKAGED_MODEL_NAME
    assert _display_name("sentence-transformers/all-mpnet-base-v2") == "sentence-transformers/all-mpnet-base-v2"


def test_bare_minilm_is_sentence_transformers_own_encoding(minilm):
    """The bare backbone as an embedding model = sentence-transformers' encode(normalize_embeddings=True)."""
    from sentence_transformers import SentenceTransformer

    from server.backbone import packaged_model_path
    from server.delta import backbone_embedding

    texts = ["A man is playing a guitar.", "deltaserve serves many tasks on one backbone",
             "a 🤖 delight , truly ✨", "short", "The quick brown fox jumps over the lazy dog. " * 5]
    model = SentenceTransformer(packaged_model_path(), device="cpu")
    want = model.encode(texts, normalize_embeddings=True, convert_to_tensor=True, batch_size=8)
    bare = backbone_embedding(minilm)
    got = Engine(minilm).forward([Row(bare, text) for text in minilm.encode(texts)])
    torch.testing.assert_close(torch.stack(got), want.float().cpu(), atol=1e-5, rtol=0)
