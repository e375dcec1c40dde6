"""`deltaserve train --task-type embedding`: pair data, the ranking loss, the retrieval metrics, and
that an embedding delta is served exactly as it was trained (tiny random backbones)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from adapters_store.format import DeltaMeta, parse_delta
from server.backbone import Backbone
from tests.conftest import make_tiny_backbone, make_tiny_model
from tests.test_train import method_args
from training.cli import main
from training.embedding import (
    Pair,
    TextIndex,
    batch_loss,
    best_threshold_f1,
    embed,
    embedding_optimizer,
    evaluate_pairs,
    pair_batches,
    ranking_loss,
    read_pairs,
    results_table,
    retrieval_metrics,
)
from training.methods import TaskInfo, make_method
from training.model import DeltaModel, model_from_delta
from training.trainer import TrainSettings

PAIRS = [
    Pair("The cat sat on the mat.", "A cat was sitting on a mat.", True),
    Pair("He bought a new car yesterday.", "Yesterday he purchased a new car.", True),
    Pair("Paris is the capital of France.", "France's capital city is Paris.", True),
    Pair("The stock fell 5 percent on Monday.", "Shares dropped five percent Monday.", True),
    Pair("She plays the violin.", "The violin is played by her.", True),
    Pair("Rain is expected tomorrow.", "Tomorrow it will probably rain.", True),
]
METHODS = ("mask", "lora", "dsee", "pasta", "finetune")


# --------------------------------------------------------------------------- loss and metrics


def test_ranking_loss_is_cross_entropy_of_scaled_cosines():
    anchors = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    positives = torch.tensor([[3.0, 0.0], [0.0, 1.0], [1.0, -1.0]])
    # cosines: row 0 = [1, 0, 1/√2], row 1 = [0, 1, -1/√2], row 2 = [1/√2, 1/√2, 0]
    r = 1 / math.sqrt(2)
    cos = torch.tensor([[1.0, 0.0, r], [0.0, 1.0, -r], [r, r, 0.0]])
    by_hand = sum(-math.log(math.exp(20 * cos[i, i]) / sum(math.exp(20 * c) for c in cos[i])) for i in range(3)) / 3
    assert ranking_loss(anchors, positives).item() == pytest.approx(by_hand, rel=1e-5)
    assert ranking_loss(anchors, positives, scale=1.0).item() < by_hand  # the scale sharpens the softmax


def test_retrieval_recall_at_1_and_mrr_by_hand():
    corpus = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    queries = torch.tensor([[1.0, 0.1], [1.0, 0.2], [-1.0, 0.5], [0.0, 1.0]])
    # query 0 -> corpus 0: rank 1; query 1 -> corpus 1: corpus 0 scores higher, rank 2; query 2 -> corpus 2: rank 1;
    # query 3 -> corpus 2: corpus 1 scores higher and corpus 0 ties with it (both 0), and ties count against: rank 3
    metrics = retrieval_metrics(queries, corpus, [0, 1, 2, 2])
    assert metrics["recall_at_1"] == pytest.approx(2 / 4)
    assert metrics["mrr"] == pytest.approx((1 + 1 / 2 + 1 + 1 / 3) / 4)


def test_a_collapsed_model_does_not_score_perfectly():
    same = torch.ones(5, 3)
    metrics = retrieval_metrics(same, same, list(range(5)))
    assert metrics["recall_at_1"] == 0.0 and metrics["mrr"] == pytest.approx(1 / 5)


def test_best_threshold_f1_by_hand():
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    matches = [True, False, True, True, False, False]
    # cuts: ≥0.9: tp1 p1 -> 2/(1+3)=.5; ≥0.8: 2/(2+3)=.4; ≥0.7: 4/(3+3)=.667; ≥0.6: 6/(4+3)=.857; ≥0.5: 6/8=.75
    f1, threshold = best_threshold_f1(scores, matches)
    assert f1 == pytest.approx(6 / 7)
    assert threshold == pytest.approx(0.55)
    # equal scores are never split by a threshold
    f1, threshold = best_threshold_f1([0.5, 0.5, 0.1], [True, False, False])
    assert f1 == pytest.approx(2 / 3) and threshold == pytest.approx(0.3)
    assert best_threshold_f1([0.2, 0.1], [False, False]) == (0.0, 0.2)


def test_pair_batches_never_repeat_a_text_and_cover_every_pair():
    pairs = [Pair(f"q{i % 7}", f"a{i}") for i in range(40)] + [Pair("a3", "zz")]  # q* repeat; a3 on both sides
    batches = pair_batches(pairs, 8, random.Random(0))
    seen = [i for b in batches for i in b]
    assert len(seen) == len(set(seen))
    assert len(set(seen)) >= len(pairs) - 1  # at most a lone last pair is left out
    for batch in batches:
        texts = [t for i in batch for t in (pairs[i].text, pairs[i].pair)]
        assert len(texts) == len(set(texts)) and 2 <= len(batch) <= 8


# --------------------------------------------------------------------------- data


def test_read_pairs_mrpc_layout_and_labels(tmp_path):
    path = tmp_path / "mrpc.tsv"
    path.write_text("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
                    '1\t1\t2\tHe said "yes.\tHe agreed.\n0\t3\t4\tA b.\tC d.\n', encoding="utf-8")
    pairs = read_pairs(path)
    assert pairs == [Pair('He said "yes.', "He agreed.", True), Pair("A b.", "C d.", False)]
    with pytest.raises(ValueError, match="positive-label"):
        read_pairs(path, positive_label="yes")


def test_read_pairs_without_labels_and_named_columns(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"q": "what is it", "a": "it is this"}\n{"q": "who", "a": "her"}\n')
    assert read_pairs(path, "q", "a") == [Pair("what is it", "it is this"), Pair("who", "her")]
    with pytest.raises(ValueError, match="pair"):
        read_pairs(path, "q", "answer")


# --------------------------------------------------------------------------- training


def _model(tokenizer, method: str) -> tuple[DeltaModel, object]:
    backbone = make_tiny_backbone(tokenizer)
    torch.manual_seed(0)
    model = DeltaModel(backbone, "embedding", 0)
    m = make_method(method, method_args())
    m.setup(model, TaskInfo("embedding", 0, False))
    return model, m


@pytest.mark.parametrize("method", METHODS)
def test_a_few_steps_lower_the_ranking_loss(tokenizer, method):
    model, m = _model(tokenizer, method)
    index = TextIndex(PAIRS, model.backbone, 64)
    group = list(range(len(PAIRS)))
    settings = TrainSettings(method=method, task_type="embedding", train="", eval="")
    optimizer = embedding_optimizer(model, m, settings)
    model.eval()
    with torch.no_grad():
        before = batch_loss(model, PAIRS, group, index, torch.no_grad()).item()
    model.train()
    for _ in range(5):
        loss = batch_loss(model, PAIRS, group, index, torch.enable_grad())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        after = batch_loss(model, PAIRS, group, index, torch.no_grad()).item()
    assert after < before - 1e-3, (before, after)


def test_embedding_vectors_are_mean_pooled_and_normalised(tokenizer):
    model, _ = _model(tokenizer, "lora")  # B = 0: the bare backbone's function
    index = TextIndex(PAIRS[:2], model.backbone, 64)
    vectors = embed(model, index.encoded, 8)
    ids = torch.tensor([index.encoded[0].input_ids])
    with torch.no_grad():
        hidden = model.backbone.model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]
    assert torch.allclose(vectors[0], F.normalize(hidden.mean(0), dim=0), atol=1e-5)
    assert torch.allclose(vectors.norm(dim=1), torch.ones(len(vectors)), atol=1e-5)


def _perturbed_delta(tokenizer, method: str) -> tuple[DeltaModel, bytes]:
    model, m = _model(tokenizer, method)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.trainable_parameters():
            if method == "mask":
                p.copy_(torch.rand(p.shape, generator=gen) * 0.02)
            else:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    if method == "dsee":
        m.before_phase(model, 1)
    meta = DeltaMeta(method=method, task_type="embedding", labels=(),
                     backbone_fingerprint=model.backbone.fingerprint, max_length=64)
    return model, model.export(meta).to_bytes()


@pytest.mark.parametrize("method", ("mask", "lora", "dsee", "pasta"))
def test_the_engine_serves_the_embedding_as_trained(tokenizer, method):
    from server.delta import prepare_delta
    from server.engine import Engine, Row

    model, data = _perturbed_delta(tokenizer, method)
    served = make_tiny_backbone(tokenizer)
    delta = parse_delta(data, served.spec())
    assert delta.meta.task_type == "embedding" and delta.meta.labels == () and delta.head.classifier_weight is None
    if method == "mask":
        assert "pooler.dense" not in delta.keep  # the embedding never reads the pooler
    index = TextIndex(PAIRS, served, 64)
    trained = embed(model, index.encoded, 4)
    reloaded = embed(model_from_delta(make_tiny_backbone(tokenizer), delta), index.encoded, 4)
    assert torch.allclose(reloaded, trained, atol=1e-5)
    engine = Engine(served)
    prepared = prepare_delta(data, served, name="e", version=1)
    texts = list(index.id)
    outs = engine.forward([Row(delta=prepared, text=e) for e in served.encode(texts, 64)])
    for row, out in enumerate(outs):
        assert out.shape == trained[row].shape
        assert torch.allclose(out.float(), trained[row], atol=2e-5), (out - trained[row]).abs().max()


def test_evaluate_pairs_counts_queries_corpus_and_f1(tokenizer):
    model, _ = _model(tokenizer, "lora")
    pairs = [*PAIRS, Pair(PAIRS[0].text, PAIRS[1].pair, False), Pair("Nothing here.", "Unrelated words.", False)]
    scores = evaluate_pairs(model, pairs, TextIndex(pairs, model.backbone, 64), 4)
    assert scores["eval_queries"] == len(PAIRS) and scores["eval_corpus"] == len(PAIRS)
    assert 0 < scores["eval_mrr"] <= 1 and 0 <= scores["eval_recall_at_1"] <= scores["eval_mrr"]
    assert 0 < scores["eval_f1"] <= 1 and -1 <= scores["eval_f1_threshold"] <= 1
    assert "eval_f1" not in evaluate_pairs(model, PAIRS, TextIndex(PAIRS, model.backbone, 64), 4)


# --------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("tiny-bert-emb")
    make_tiny_model("bert").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _write(path: Path, pairs) -> Path:
    path.write_text("label\tfirst\tsecond\n" + "".join(f"{int(p.match)}\t{p.text}\t{p.pair}\n" for p in pairs))
    return path


def test_train_command_writes_a_valid_embedding_delta_and_report(tmp_path, tiny_folder):
    train = _write(tmp_path / "train.tsv", [*PAIRS, *PAIRS[:3], Pair("x y", "z w", False)])
    evaluation = _write(tmp_path / "eval.tsv", [Pair("A dog ran in the park.", "In the park a dog was running.", True),
                                                Pair("Prices rose sharply.", "Costs went up fast.", True),
                                                Pair("A dog ran in the park.", "Prices rose sharply.", False)])
    val = _write(tmp_path / "val.tsv", PAIRS[4:])
    out, report = tmp_path / "e.safetensors", tmp_path / "r.json"
    rc = main(["train", "--method", "lora", "--task-type", "embedding", "--train", str(train), "--eval",
               str(evaluation), "--val", str(val), "--text-column", "first", "--pair-column", "second",
               "--backbone", str(tiny_folder), "--epochs", "2", "--batch-size", "4", "--out", str(out),
               "--report", str(report), "--quiet"])
    assert rc == 0
    backbone = Backbone.load(tiny_folder, device="cpu")
    delta = parse_delta(out.read_bytes(), backbone.spec())
    assert delta.meta.task_type == "embedding" and delta.meta.pooling == "mean" and delta.meta.normalize
    assert delta.low_rank and delta.head.projection_weight is None
    rep = json.loads(report.read_text())
    for key in ("eval_recall_at_1", "eval_mrr", "eval_f1", "eval_f1_threshold", "val_mrr", "backbone_eval",
                "train_cpu_seconds", "delta_bytes", "history", "loss"):
        assert key in rep
    assert rep["train_examples"] == 7  # the 9 matching pairs of train.tsv less the 2 that --val holds
    assert rep["eval_queries"] == 2 and len(rep["history"]) == 2
    assert rep["delta_bytes"] == out.stat().st_size
    rows = results_table([rep]).splitlines()
    assert rows[2].startswith("| bare backbone |") and rows[3].startswith("| lora |") and len(rows) == 4


def test_train_command_finetune_reports_without_a_delta(tmp_path, tiny_folder):
    train = _write(tmp_path / "train.tsv", PAIRS)
    evaluation = _write(tmp_path / "eval.tsv", PAIRS[:2])
    rc = main(["train", "--method", "finetune", "--task-type", "embedding", "--train", str(train), "--eval",
               str(evaluation), "--val-fraction", "0.34", "--backbone", str(tiny_folder), "--epochs", "1",
               "--text-column", "first", "--pair-column", "second", "--no-baseline",
               "--batch-size", "4", "--report", str(tmp_path / "r.json"), "--quiet"])
    assert rc == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["delta_bytes"] is None and rep["method"] == "finetune" and rep["backbone_eval"] is None



def test_the_server_answers_with_the_trained_embeddings(tmp_path, tiny_folder):
    """Train on the tiny folder, push the delta to a real server, ask over HTTP: the trainer's vectors."""
    import httpx

    from server.app import create_app
    from tests.http_helpers import ADMIN, live_server, settings
    from training.cli import push
    from training.embedding import encode_texts
    from training.methods import make_method
    from training.trainer import train

    data = _write(tmp_path / "train.tsv", [*PAIRS, Pair("x y", "z w", False)])
    evaluation = _write(tmp_path / "eval.tsv", PAIRS[:3])
    run = TrainSettings(method="pasta", task_type="embedding", train=str(data), eval=str(evaluation),
                        val_fraction=0.34, text_column="first", text_pair_column="second",
                        backbone=str(tiny_folder), epochs=1, batch_size=4, max_length=64)
    result = train(run, make_method("pasta", method_args()), progress=False)
    assert result.delta_bytes is not None
    texts = ["The cat sat on the mat.", "Völlig unerwartet: ein 🤖 [MASK] im Text.", "short"]
    expected = embed(result.model, encode_texts(texts, result.model.backbone, 64), 4)
    app = create_app(settings(tmp_path / "store"), backbone=Backbone.load(tiny_folder, device="cpu"))
    with live_server(app) as url:
        push(url, "paraphrase", result.delta_bytes, "s3cret")
        answer = httpx.post(f"{url}/tasks/paraphrase/predict", json={"inputs": texts}, headers=ADMIN)
        answer.raise_for_status()
        got = torch.tensor([p["embedding"] for p in answer.json()["predictions"]])
        openai_answer = httpx.post(f"{url}/v1/embeddings", json={"model": "paraphrase", "input": texts},
                                   headers=ADMIN).json()
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=2e-4), (got - expected).abs().max()
    via_openai = torch.tensor([item["embedding"] for item in openai_answer["data"]])
    assert torch.allclose(via_openai, expected, atol=2e-4)
