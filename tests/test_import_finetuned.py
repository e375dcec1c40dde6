"""`deltaserve import-finetuned` and `deltaserve export`, with models made here.

A tiny BERT backbone is saved to a folder; a classifier is fine-tuned from it for a few steps
with plain transformers (every weight moves), or made as a merged LoRA (W + s·B·A). The import
is checked against the original run by transformers and the delta run by the engine; the export
is loaded by `transformers.pipeline` and checked against the engine.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForTokenClassification,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    pipeline,
)

from adapters_store.format import parse_delta
from server.backbone import Backbone
from server.delta import prepare_delta
from server.engine import Engine, Row
from tests.conftest import make_tiny_model
from tests.delta_builders import NER_LABELS, build_delta
from training.cli import main
from training.finetuned_import import ImportFinetunedError, import_finetuned

TEXTS = ["a gripping , funny film", "dull and far too long", "The cat sat on the mat .",
         "Paris is the capital of France", "not bad at all", "I would not recommend it"]
LABELS = {0: "negative", 1: "neutral", 2: "positive"}


@pytest.fixture
def base_dir(tmp_path, tokenizer) -> Path:
    folder = tmp_path / "base"
    make_tiny_model("bert").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _classifier(base_dir: Path, seed: int = 1) -> BertForSequenceClassification:
    config = BertConfig.from_pretrained(base_dir, num_labels=3, id2label=LABELS,
                                        label2id={v: k for k, v in LABELS.items()})
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config)
    model.bert.load_state_dict(BertModel.from_pretrained(base_dir).state_dict())
    return model


def _finetune(base_dir: Path, tokenizer, out: Path, steps: int = 6) -> Path:
    """A few AdamW steps on every weight (embeddings, LayerNorms, biases included), as a user's fine-tune."""
    model = _classifier(base_dir).train()
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    labels = torch.tensor([2, 0, 1, 1, 2, 0])
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()
    model.eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _merged_lora(base_dir: Path, tokenizer, out: Path, rank: int = 4) -> tuple[Path, int]:
    """W + (α/r)·B·A merged into query/value/ffn_in of every layer; returns the folder and the LoRA's bytes."""
    model = _classifier(base_dir)
    generator = torch.Generator().manual_seed(3)
    lora_bytes = sum(p.numel() * 4 for p in model.classifier.parameters())
    with torch.no_grad():
        for layer in model.bert.encoder.layer:
            for linear in (layer.attention.self.query, layer.attention.self.value, layer.intermediate.dense):
                out_f, in_f = linear.weight.shape
                A = torch.randn(rank, in_f, generator=generator) * 0.3
                B = torch.randn(out_f, rank, generator=generator) * 0.3
                linear.weight += (16 / rank) * (B @ A) * 0.005
                lora_bytes += (A.numel() + B.numel()) * 4
    model.eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out, lora_bytes


def _transformers_probs(folder: Path, backbone: Backbone, texts) -> torch.Tensor:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(**backbone.pad(backbone.encode(texts))).logits.softmax(-1)


def _engine_probs(data: bytes, folder: Path, texts) -> torch.Tensor:
    backbone = Backbone.load(folder, device="cpu")
    engine = Engine(backbone)
    delta = prepare_delta(data, backbone, name="t")
    logits = engine.forward([Row(delta, text) for text in backbone.encode(texts)])
    return torch.stack(logits).softmax(-1)


# --------------------------------------------------------------------------- import


def test_merged_lora_comes_back_exactly_at_its_rank(tmp_path, base_dir, tokenizer):
    checkpoint, lora_bytes = _merged_lora(base_dir, tokenizer, tmp_path / "merged")
    out, report = tmp_path / "delta.safetensors", tmp_path / "report.json"
    assert main(["import-finetuned", str(checkpoint), "--out", str(out), "--backbone", str(base_dir),
                 "--report", str(report)]) == 0
    result = json.loads(report.read_text())
    changed = [m for m in result["modules"] if m["representation"] != "unchanged"]
    assert len(changed) == 9 and all(m["representation"] == "exact low rank" and m["rank"] == 4 for m in changed)
    assert all(m["relative_error"] < 1e-5 for m in changed)
    assert len(out.read_bytes()) <= 2 * lora_bytes
    backbone = Backbone.load(base_dir, device="cpu")
    delta = parse_delta(out.read_bytes(), backbone.spec())
    assert delta.meta.labels == ("negative", "neutral", "positive") and delta.meta.method == "imported"
    assert delta.head.pooler_weight is None  # the pooler did not change: the backbone's is used
    original = _transformers_probs(checkpoint, backbone, TEXTS)
    served = _engine_probs(out.read_bytes(), base_dir, TEXTS)
    assert torch.allclose(original, served, atol=1e-4)
    assert result["fidelity"]["max_prob_diff"] <= 1e-4 and result["fidelity"]["label_agreement"] == 1.0


def test_full_finetune_is_compressed_measured_and_served(tmp_path, base_dir, tokenizer):
    checkpoint = _finetune(base_dir, tokenizer, tmp_path / "ft")
    backbone = Backbone.load(base_dir, device="cpu")
    result = import_finetuned(checkpoint, backbone, calibration=TEXTS * 3, budget_bytes=60_000)
    report = result.report()
    assert len(result.data) <= 60_000  # the whole file, header included
    kinds = {m["representation"] for m in report["modules"]}
    assert kinds <= {"low rank", "low rank + sparse", "sparse", "dropped"} and "low rank" in " ".join(kinds)
    assert report["head_pooler"]  # fine-tuning moved the pooler: it travels whole
    # Biases, LayerNorms, positions and token types travel as their own parts; only the word embeddings stay.
    assert report["carried"] == ["biases", "layer_norms", "position_embeddings"]
    delta = parse_delta(result.data, backbone.spec())
    assert set(delta.bias) == set(backbone.linear_modules) - {"pooler.dense"}
    assert set(delta.norms) == set(backbone.layer_norms) and delta.embedding_shift is not None
    not_carried = {n["kind"]: n for n in report["not_carried"]}
    assert set(not_carried) == {"word_embeddings"}
    assert all(n["relative_change"] > 0 and 0 <= n["effect"]["max_prob_diff"] <= 1 for n in not_carried.values())
    assert report["carried_ceiling"] == not_carried["word_embeddings"]["effect"]
    # The fidelity it reports is the engine's delta against transformers' original, recomputed here.
    original = _transformers_probs(checkpoint, backbone, TEXTS * 3)
    served = _engine_probs(result.data, base_dir, TEXTS * 3)
    assert abs(float((original - served).abs().max()) - result.fidelity.max_prob_diff) < 1e-5
    # More bytes carry ΔW more closely.
    bigger = import_finetuned(checkpoint, Backbone.load(base_dir, device="cpu"), calibration=TEXTS,
                              budget_bytes=400_000)
    error = sum(c.relative_error for c in result.choices)
    assert sum(c.relative_error for c in bigger.choices) < error


def test_biases_and_norms_wait_for_a_budget_that_holds_them(tmp_path, base_dir, tokenizer):
    """Under a budget where they would take more than a quarter of the bytes, they are reported, not carried."""
    checkpoint = _finetune(base_dir, tokenizer, tmp_path / "ft")
    result = import_finetuned(checkpoint, Backbone.load(base_dir, device="cpu"), calibration=TEXTS,
                              budget_bytes=12_000)
    report = result.report()
    assert report["carried"] == [] and not parse_delta(result.data, Backbone.load(base_dir).spec()).bias
    assert {n["kind"] for n in report["not_carried"]} == {"word_embeddings", "position_embeddings", "layer_norms",
                                                          "biases"}


def test_gate_writes_nothing_unless_forced(tmp_path, base_dir, tokenizer):
    checkpoint = _finetune(base_dir, tokenizer, tmp_path / "ft")
    out = tmp_path / "delta.safetensors"
    args = ["import-finetuned", str(checkpoint), "--out", str(out), "--backbone", str(base_dir),
            "--budget-bytes", "20000", "--max-mean-prob-diff", "0"]
    assert main(args) == 1 and not out.exists()
    assert main([*args, "--force"]) == 0 and out.exists()


def test_token_classification_checkpoint(tmp_path, base_dir, tokenizer):
    from transformers import BertForTokenClassification

    labels = dict(enumerate(NER_LABELS))
    config = BertConfig.from_pretrained(base_dir, num_labels=len(labels), id2label=labels,
                                        label2id={v: k for k, v in labels.items()})
    model = BertForTokenClassification(config)
    model.bert.load_state_dict(BertModel.from_pretrained(base_dir, add_pooling_layer=False).state_dict())
    with torch.no_grad():
        model.bert.encoder.layer[1].attention.self.key.weight += 0.01 * torch.randn(32, 2) @ torch.randn(2, 32)
    model.save_pretrained(tmp_path / "ner")
    result = import_finetuned(tmp_path / "ner", Backbone.load(base_dir, device="cpu"), calibration=TEXTS)
    assert result.delta.meta.task_type == "token-classification" and result.delta.meta.labels == NER_LABELS
    assert [c.rank for c in result.choices if c.representation != "unchanged"] == [2]
    assert result.passed and result.fidelity.max_prob_diff < 1e-4


def test_pruned_checkpoint_becomes_a_keep_mask(tmp_path, base_dir, tokenizer):
    backbone = Backbone.load(base_dir, device="cpu")
    data = build_delta(backbone, parts=("keep",), method="mask", labels=("a", "b"), pooler_head=True)
    (tmp_path / "mask.safetensors").write_bytes(data)
    assert main(["export", str(tmp_path / "mask.safetensors"), str(tmp_path / "exported"),
                 "--backbone", str(base_dir)]) == 0
    result = import_finetuned(tmp_path / "exported", Backbone.load(base_dir, device="cpu"), calibration=TEXTS)
    masked = [c for c in result.choices if c.representation != "unchanged"]
    assert len(masked) == 3 and all(c.representation == "keep" and c.relative_error == 0 for c in masked)
    assert result.fidelity.max_prob_diff < 1e-5


@pytest.mark.parametrize(("make", "expected"), [
    ("missing", "no such folder"),
    ("no-config", "config.json"),
    ("corrupt", "cannot be read"),
    ("no-head", "no classification head"),
    ("wider", "hidden_size is 48 in the checkpoint, 32 in the backbone"),
    ("other-weights", "not fine-tuned from this backbone"),
])
def test_bad_checkpoints_are_refused_naming_the_problem(tmp_path, base_dir, tokenizer, capsys, make, expected):
    folder = tmp_path / "ckpt"
    if make in ("no-config", "corrupt"):
        _classifier(base_dir).save_pretrained(folder)
        if make == "no-config":
            (folder / "config.json").unlink()
        else:
            (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json" + b"\0" * 64)
    elif make == "no-head":
        BertModel.from_pretrained(base_dir).save_pretrained(folder)
    elif make == "wider":
        config = BertConfig(hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                            max_position_embeddings=128, vocab_size=30522, num_labels=2)
        BertForSequenceClassification(config).save_pretrained(folder)
    elif make == "other-weights":
        config = BertConfig.from_pretrained(base_dir, num_labels=2)
        BertForSequenceClassification(config).save_pretrained(folder)
    out = tmp_path / "delta.safetensors"
    assert main(["import-finetuned", str(folder), "--out", str(out), "--backbone", str(base_dir)]) == 2
    assert expected in capsys.readouterr().err
    assert not out.exists()


def test_another_tokenizer_is_refused(tmp_path, base_dir, tokenizer):
    checkpoint, _ = _merged_lora(base_dir, tokenizer, tmp_path / "merged")
    definition = json.loads((checkpoint / "tokenizer.json").read_text())
    vocab = definition["model"]["vocab"]
    vocab["deltaserve-token"] = vocab.pop(next(token for token, index in vocab.items() if index == 2000))
    (checkpoint / "tokenizer.json").write_text(json.dumps(definition))
    with pytest.raises(ImportFinetunedError, match="vocabulary differs"):
        import_finetuned(checkpoint, Backbone.load(base_dir, device="cpu"), calibration=TEXTS)


# --------------------------------------------------------------------------- export


@pytest.mark.parametrize(("family", "parts", "method", "pooler_head"), [
    ("bert", ("keep",), "mask", False),
    ("bert", ("lora",), "lora", True),
    ("bert", ("keep", "lora", "sparse", "head_keep"), "dsee", False),
    ("bert", ("keep", "lora", "bias", "norms"), "imported", True),  # biases, LayerNorms, embeddings fold in
    ("roberta", ("lora", "bias", "norms"), "imported", False),  # positions after RoBERTa's padding index
    ("roberta", ("lora", "sparse"), "dsee", False),
])
def test_export_answers_as_the_server_does(tmp_path, tokenizer, family, parts, method, pooler_head):
    base = tmp_path / "base"
    make_tiny_model(family).save_pretrained(base)
    tokenizer.save_pretrained(base)
    backbone = Backbone.load(base, device="cpu")
    data = build_delta(backbone, parts=parts, method=method, labels=("negative", "neutral", "positive"),
                       pooler_head=pooler_head)
    (tmp_path / "d.safetensors").write_bytes(data)
    assert main(["export", str(tmp_path / "d.safetensors"), str(tmp_path / "out"), "--backbone", str(base)]) == 0
    classify = pipeline("text-classification", model=str(tmp_path / "out"), top_k=None, device="cpu")
    answers = classify(TEXTS, truncation=True)
    served = _engine_probs(data, base, TEXTS)
    for answer, probs in zip(answers, served, strict=True):
        by_label = {item["label"]: item["score"] for item in answer}
        assert list(by_label) and set(by_label) == {"negative", "neutral", "positive"}
        expected = dict(zip(("negative", "neutral", "positive"), probs.tolist(), strict=True))
        assert all(abs(by_label[k] - expected[k]) <= 1e-4 for k in expected)


def test_export_token_classification_and_round_trip(tmp_path, base_dir, tokenizer):
    backbone = Backbone.load(base_dir, device="cpu")
    generator = torch.Generator().manual_seed(5)
    lora = {}
    for module in ("encoder.layer.0.attention.self.value", "encoder.layer.2.intermediate.dense"):
        out_f, in_f = backbone.linear_modules[module]
        lora[f"{module}.lora_A"] = torch.randn(2, in_f, generator=generator) * 0.1
        lora[f"{module}.lora_B"] = torch.randn(out_f, 2, generator=generator) * 0.1
    data = build_delta(backbone, parts=(), method="lora", task_type="token-classification", labels=NER_LABELS,
                       extra=lora)
    (tmp_path / "ner.safetensors").write_bytes(data)
    assert main(["export", str(tmp_path / "ner.safetensors"), str(tmp_path / "ner"), "--backbone",
                 str(base_dir)]) == 0
    model = AutoModelForTokenClassification.from_pretrained(tmp_path / "ner").eval()
    encoded = backbone.encode(TEXTS)
    with torch.no_grad():
        exported = model(**backbone.pad(encoded)).logits
    engine = Engine(Backbone.load(base_dir, device="cpu"))
    delta = prepare_delta(data, engine.backbone, name="ner")
    served = engine.forward([Row(delta, text) for text in encoded])
    for row, (text, logits) in enumerate(zip(encoded, served, strict=True)):
        assert torch.allclose(exported[row, : len(text.input_ids)], logits, atol=1e-4)
    # ... and the exported folder imports back: the LoRA at its own rank (2), exactly.
    result = import_finetuned(tmp_path / "ner", Backbone.load(base_dir, device="cpu"), calibration=TEXTS)
    assert {(c.representation, c.rank) for c in result.choices if c.representation != "unchanged"} == {
        ("exact low rank", 2)}
    assert result.fidelity.max_prob_diff < 1e-4


def test_export_refuses_what_no_standard_class_expresses(tmp_path, base_dir, tokenizer, capsys):
    backbone = Backbone.load(base_dir, device="cpu")
    (tmp_path / "pasta.safetensors").write_bytes(build_delta(backbone, parts=("pasta",), method="pasta"))
    assert main(["export", str(tmp_path / "pasta.safetensors"), str(tmp_path / "out"), "--backbone",
                 str(base_dir)]) == 2
    assert "PASTA" in capsys.readouterr().err and not (tmp_path / "out").exists()
    mean = build_delta(backbone, parts=("lora",), metadata={"pooling": "mean"})
    (tmp_path / "mean.safetensors").write_bytes(mean)
    assert main(["export", str(tmp_path / "mean.safetensors"), str(tmp_path / "out"), "--backbone",
                 str(base_dir)]) == 2
    assert "mean pooling" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert main(["export", "no-such-task", str(tmp_path / "out"), "--backbone", str(base_dir),
                 "--store", str(tmp_path / "nowhere")]) == 2
    assert "not a file" in capsys.readouterr().err


@pytest.mark.parametrize(("pooling", "projection", "normalize"), [("mean", None, True), ("cls", 16, False)])
def test_embedding_exports_as_a_sentence_transformers_folder(tmp_path, base_dir, tokenizer, pooling, projection,
                                                            normalize):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    backbone = Backbone.load(base_dir, device="cpu")
    metadata = {"pooling": pooling, **({} if normalize else {"normalize": "false"})}
    data = build_delta(backbone, parts=("lora", "keep"), task_type="embedding", projection=projection,
                       metadata=metadata)
    (tmp_path / "emb.safetensors").write_bytes(data)
    assert main(["export", str(tmp_path / "emb.safetensors"), str(tmp_path / "st"), "--backbone",
                 str(base_dir)]) == 0
    model = sentence_transformers.SentenceTransformer(str(tmp_path / "st"), device="cpu")
    exported = torch.as_tensor(model.encode(TEXTS, convert_to_numpy=True))
    engine = Engine(Backbone.load(base_dir, device="cpu"))
    delta = prepare_delta(data, engine.backbone, name="emb")
    served = torch.stack(engine.forward([Row(delta, text) for text in backbone.encode(TEXTS)]))
    assert exported.shape == served.shape
    assert torch.allclose(exported, served, atol=1e-4)

