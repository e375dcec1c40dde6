"""`deltaserve train` on tiny backbones: each method learns, and what it exports is what it trained.

The exported delta is re-loaded two ways — by the trainer's own `DeltaModel` and by the
serving engine — and both must reproduce the trainer's logits.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import pytest
import torch

from adapters_store.format import parse_delta
from server.backbone import Backbone
from tests.conftest import make_tiny_backbone, make_tiny_model
from training.cli import main
from training.data import Example, batches, collate, encode
from training.methods import TaskInfo, make_method
from training.model import DeltaModel, model_from_delta
from training.trainer import TrainSettings, build_model, loss_fn, optimizer_for

SENTENCES = [
    ("a gripping , funny and deeply humane film", "1"),
    ("dull and lifeless", "0"),
    ("the best movie of the year", "1"),
    ("an [UNK] mess from start to finish", "0"),
    ("warm , witty and wise", "1"),
    ("it is not worth your time", "0"),
]
PAIRS = [
    ("The cat sat on the mat.", "A cat was sitting on a mat.", "1"),
    ("Paris is in France.", "Berlin is big.", "0"),
    ("He bought a car.", "He purchased a car.", "1"),
]
NER = [
    (("John", "Smith", "flew", "to", "New", "York"), ("B-PER", "I-PER", "O", "O", "B-LOC", "I-LOC")),
    (("EU", "rejects", "German", "call"), ("B-ORG", "O", "B-MISC", "O")),
]
METHODS = ("mask", "pasta", "dsee", "lora", "finetune")


def method_args(**overrides) -> argparse.Namespace:
    """The CLI's defaults for every method option."""
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    from training.cli import add_parsers

    add_parsers(sub)
    args = parser.parse_args(["train", "--method", "lora", "--train", "x", "--eval", "x",
                              "--task-type", "sequence-classification"])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def examples(task_type: str, pairs: bool = False) -> tuple[list[Example], list[str]]:
    if task_type == "token-classification":
        exs = [Example(words, None, tags) for words, tags in NER]
        return exs, sorted({t for _, tags in NER for t in tags})
    if pairs:
        return [Example(a, b, y) for a, b, y in PAIRS], ["0", "1"]
    return [Example(t, None, y) for t, y in SENTENCES], ["0", "1"]


def setup(backbone: Backbone, method: str, task_type: str = "sequence-classification", pairs: bool = False,
          head_pooler: bool = False, **overrides):
    exs, labels = examples(task_type, pairs)
    settings = TrainSettings(method=method, task_type=task_type, train="", eval="", head_pooler=head_pooler)
    m = make_method(method, method_args(**overrides))
    model = build_model(settings, m, backbone, labels, pairs)
    batch = collate(encode(exs, backbone, labels, task_type, 64), backbone.pad_id)
    return settings, m, model, batch


def logits_of(model: DeltaModel, batch: dict) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model.run(batch)


@pytest.mark.parametrize("method", METHODS)
def test_one_step_lowers_the_loss(tokenizer, method):
    backbone = make_tiny_backbone(tokenizer)
    settings, m, model, batch = setup(backbone, method)
    optimizer = optimizer_for(model, m, settings)
    before = loss_fn(logits_of(model, batch), batch["labels"])
    model.train()
    loss = loss_fn(model.run(batch), batch["labels"])
    loss.backward()
    body = [p for p in model.trainable_parameters() if all(p is not q for q in model.classifier.parameters())]
    assert body and any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in body), "method params get no grad"
    optimizer.step()
    after = loss_fn(logits_of(model, batch), batch["labels"])
    assert after < before


def test_trainable_parameters_are_only_the_methods(tokenizer):
    backbone = make_tiny_backbone(tokenizer)
    d, layers = backbone.hidden_size, backbone.num_layers
    _, _, model, _ = setup(backbone, "pasta")
    assert sum(p.numel() for p in model.trainable_parameters()) == layers * 2 * d + 2 * d + 2
    _, _, model, _ = setup(make_tiny_backbone(tokenizer), "lora")  # every linear of every layer, rank 8
    low_rank = sum(8 * (fan_in + fan_out) for name, (fan_out, fan_in) in backbone.linear_modules.items()
                   if name.startswith("encoder.layer."))
    assert sum(p.numel() for p in model.trainable_parameters()) == low_rank + 2 * d + 2
    assert len(model.deltas) == layers * 6


def perturb(model: DeltaModel, method: str, seed: int = 0) -> None:
    """Make every trained part non-trivial, as after real training."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            if method == "mask" and p.dim() == 2 and p.shape != model.classifier.weight.shape:
                p.copy_(torch.rand(p.shape, generator=gen) * 0.02)  # ~half the weights masked
            elif method != "finetune":
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)


CASES = [
    ("mask", "sequence-classification", False, {}),
    ("mask", "sequence-classification", False, {"mask_classifier": True}),
    ("pasta", "sequence-classification", True, {}),
    ("pasta", "token-classification", False, {}),
    ("dsee", "sequence-classification", False, {"dsee_prune": "unstructured"}),
    ("dsee", "sequence-classification", True, {"dsee_prune": "structured", "dsee_heads": 2}),
    ("lora", "sequence-classification", False, {"head_pooler": True}),
    ("lora", "token-classification", False, {}),
]


def _exported(tokenizer, method, task_type, pairs, overrides):
    overrides = dict(overrides)
    head_pooler = overrides.pop("head_pooler", False)
    backbone = make_tiny_backbone(tokenizer)
    _, m, model, batch = setup(backbone, method, task_type, pairs, head_pooler, **overrides)
    perturb(model, method)
    if method == "dsee":
        m.before_phase(model, 1)  # prune, as between DSEE's phases
    from adapters_store.format import DeltaMeta

    meta = DeltaMeta(method=method, task_type=task_type, labels=tuple(examples(task_type, pairs)[1]),
                     backbone_fingerprint=backbone.fingerprint, max_length=64)
    data = model.export(meta).to_bytes()
    return backbone, model, batch, data


@pytest.mark.parametrize(("method", "task_type", "pairs", "overrides"), CASES)
def test_exported_delta_reloads_to_the_same_logits(tokenizer, method, task_type, pairs, overrides):
    _backbone, model, batch, data = _exported(tokenizer, method, task_type, pairs, overrides)
    expected = logits_of(model, batch)
    fresh = make_tiny_backbone(tokenizer)
    delta = parse_delta(data, fresh.spec())
    assert delta.meta.method == method and delta.meta.max_length == 64
    reloaded = model_from_delta(fresh, delta)
    assert torch.allclose(logits_of(reloaded, batch), expected, atol=1e-5, rtol=0)


def _texts(task_type: str, pairs: bool) -> list:
    if task_type == "token-classification":
        return [" ".join(words) for words, _ in NER]
    if pairs:
        return [(a, b) for a, b, _ in PAIRS] + [("a 🤖 [MASK] b .", "c [UNK] [SEP] d")]
    return [t for t, _ in SENTENCES + EVAL_SENTENCES]


@pytest.mark.parametrize(("method", "task_type", "pairs", "overrides"), CASES)
def test_engine_serves_exactly_what_was_trained(tokenizer, method, task_type, pairs, overrides):
    from server.delta import prepare_delta
    from server.engine import Engine, Row

    _trainer_backbone, model, _, data = _exported(tokenizer, method, task_type, pairs, overrides)
    served = make_tiny_backbone(tokenizer)  # the engine patches its backbone in place
    engine = Engine(served)
    prepared = prepare_delta(data, served, name="t", version=1)
    encoded = served.encode(_texts(task_type, pairs), 64)
    outs = engine.forward([Row(delta=prepared, text=e) for e in encoded])
    for text, out in zip(encoded, outs, strict=True):
        ids = torch.tensor([text.input_ids])
        types = torch.tensor([text.token_type_ids]) if text.token_type_ids is not None else None
        single = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                  "special_tokens_mask": torch.tensor([text.special_tokens_mask])}
        if types is not None:
            single["token_type_ids"] = types
        expected = logits_of(model, single)[0]
        assert out.shape == expected.shape
        assert torch.allclose(out, expected, atol=1e-5, rtol=0), (out - expected).abs().max()


def test_padding_does_not_change_logits(tokenizer):
    backbone = make_tiny_backbone(tokenizer)
    _, _, model, batch = setup(backbone, "pasta")
    perturb(model, "pasta")
    together = logits_of(model, batch)
    for row in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][row].sum())
        single = {k: v[row:row + 1, :n] for k, v in batch.items() if k != "labels"}
        assert torch.allclose(logits_of(model, single)[0], together[row], atol=1e-5)


def test_batches_bucket_by_length_and_cover_everything(tokenizer):
    backbone = make_tiny_backbone(tokenizer)
    exs, labels = examples("sequence-classification")
    data = encode(exs * 20, backbone, labels, "sequence-classification", 64)
    seen = []
    for group, batch in batches(data, 8, backbone.pad_id, shuffle=True, rng=random.Random(0)):
        seen.extend(group)
        assert batch["input_ids"].shape[1] == max(len(data[i].input_ids) for i in group)
    assert sorted(seen) == list(range(len(data)))


# --------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("tiny-bert")
    make_tiny_model("bert").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


EVAL_SENTENCES = [
    ("a 🤖 delight , truly ✨ - see it .", "1"),  # emoji: [UNK] tokens in the text
    ("typing [MASK] here does not make it special", "0"),
    ("funny and warm", "1"),
    ("a lifeless bore", "0"),
]


def _write_sst(folder: Path, rows=SENTENCES * 3, name: str = "sst.tsv") -> Path:
    path = folder / name
    path.write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    return path


def _write_eval(folder: Path) -> Path:
    return _write_sst(folder, EVAL_SENTENCES, "eval.tsv")


def test_train_command_writes_a_valid_delta_and_report(tmp_path, tiny_folder):
    data, evaluation = _write_sst(tmp_path), _write_eval(tmp_path)
    out, report = tmp_path / "d.safetensors", tmp_path / "r.json"
    rc = main(["train", "--method", "pasta", "--train", str(data), "--eval", str(evaluation), "--task-type",
               "sequence-classification", "--backbone", str(tiny_folder), "--epochs", "2", "--batch-size", "4",
               "--out", str(out), "--report", str(report), "--quiet"])
    assert rc == 0
    backbone = Backbone.load(tiny_folder, device="cpu")
    delta = parse_delta(out.read_bytes(), backbone.spec())
    assert delta.meta.labels == ("0", "1") and delta.pasta is not None
    rep = json.loads(report.read_text())
    for key in ("eval_accuracy", "eval_f1", "eval_mcc", "val_accuracy", "trainable_params", "delta_bytes",
                "train_seconds", "steps", "epochs", "method", "settings", "validation", "selection", "budget"):
        assert key in rep
    assert rep["delta_bytes"] == out.stat().st_size and len(rep["history"]) == 2


def test_train_command_on_conll(tmp_path, tiny_folder):
    conll = tmp_path / "ner.txt"
    conll.write_text("-DOCSTART- -X- O\n\n" + "\n\n".join(
        "\n".join(f"{w} NN {t}" for w, t in zip(words, tags, strict=True)) for words, tags in NER * 3) + "\n")
    evaluation = tmp_path / "ner-eval.txt"
    evaluation.write_text("Anna NN B-PER\nvisited NN O\nRome NN B-LOC\n")
    report = tmp_path / "r.json"
    rc = main(["train", "--method", "lora", "--train", str(conll), "--eval", str(evaluation), "--task-type",
               "token-classification", "--backbone", str(tiny_folder), "--epochs", "1", "--report", str(report),
               "--out", str(tmp_path / "ner.safetensors"), "--quiet"])
    assert rc == 0
    rep = json.loads(report.read_text())
    assert rep["labels"] == ["B-LOC", "B-MISC", "B-ORG", "B-PER", "I-LOC", "I-PER", "O"]
    assert 0.0 <= rep["eval_f1"] <= 1.0 and rep["train_examples"] + rep["val_examples"] == 6


def test_finetune_refuses_out(tmp_path, tiny_folder, capsys):
    data, evaluation = _write_sst(tmp_path), _write_eval(tmp_path)
    rc = main(["train", "--method", "finetune", "--train", str(data), "--eval", str(evaluation), "--task-type",
               "sequence-classification", "--backbone", str(tiny_folder), "--out", str(tmp_path / "x.safetensors")])
    assert rc == 2 and "no task delta can hold" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_task_info_slots(tokenizer):
    backbone = make_tiny_backbone(tokenizer)
    model = DeltaModel(backbone, "sequence-classification", 2)
    make_method("pasta", method_args()).setup(model, TaskInfo("sequence-classification", 2, pairs=True))
    assert model.pasta is not None and model.pasta.shape == (backbone.num_layers, 3, backbone.hidden_size)


def test_push_puts_the_delta_with_a_bearer_token(monkeypatch):
    import httpx

    from training.cli import push

    seen = {}

    def fake_put(url, content, headers, timeout):
        seen.update(url=url, content=content, headers=headers)
        return httpx.Response(201, request=httpx.Request("PUT", url))

    monkeypatch.setattr(httpx, "put", fake_put)
    push("http://server:8000/", "sst2", b"delta", token="s3cret")
    assert seen["url"] == "http://server:8000/tasks/sst2" and seen["content"] == b"delta"
    assert seen["headers"] == {"Content-Type": "application/octet-stream", "Authorization": "Bearer s3cret"}


def test_label_names_are_what_the_delta_serves(tmp_path, tiny_folder):
    data, evaluation = _write_sst(tmp_path), _write_eval(tmp_path)
    out, report = tmp_path / "d.safetensors", tmp_path / "r.json"
    common = ["train", "--method", "pasta", "--train", str(data), "--eval", str(evaluation), "--task-type",
              "sequence-classification", "--backbone", str(tiny_folder), "--epochs", "1", "--batch-size", "4",
              "--quiet"]
    assert main([*common, "--label-names", "negative,positive", "--out", str(out), "--report", str(report)]) == 0
    backbone = Backbone.load(tiny_folder, device="cpu")
    assert parse_delta(out.read_bytes(), backbone.spec()).meta.labels == ("negative", "positive")
    rep = json.loads(report.read_text())
    assert rep["labels"] == ["negative", "positive"] and rep["data_labels"] == ["0", "1"]
    with pytest.raises(ValueError, match="2 distinct names"):
        main([*common, "--label-names", "negative,positive,neutral"])


# --------------------------------------------------------------------------- PASTA slots


def test_special_slots_are_only_the_tokens_the_tokenizer_inserted(tokenizer):
    backbone = make_tiny_backbone(tokenizer)
    texts = ["a 🤖 delight , truly ✨ - see it .", "typing [MASK] here", ("a 🤖 [MASK] b", "c [UNK] [SEP] d")]
    encoded = backbone.encode(texts)
    slots = backbone.special_slots(encoded)
    for row, (text, enc) in enumerate(zip(texts, encoded, strict=True)):
        tokens = tokenizer.convert_ids_to_tokens(enc.input_ids)
        assert "[UNK]" in tokens or "[MASK]" in tokens  # the case under test is really there
        row_slots = slots[row, : len(tokens)].tolist()
        inserted = [0, len(tokens) - 1] if isinstance(text, str) else \
            [0, enc.sequence_ids.index(1) - 1, len(tokens) - 1]
        assert [p for p, s in enumerate(row_slots) if s >= 0] == inserted
        assert [row_slots[p] for p in inserted] == list(range(len(inserted)))
        for p, token in enumerate(tokens):
            if token in ("[UNK]", "[MASK]") or (token == "[SEP]" and p not in inserted):
                assert row_slots[p] == -1, (text, p, token)
    # the trainer's batches mark the same tokens, so it trains what the engine serves
    exs = [Example(t, None, "0") if isinstance(t, str) else Example(t[0], t[1], "0") for t in texts[:2]]
    batch = collate(encode(exs, backbone, ["0"], "sequence-classification", 64), backbone.pad_id)
    assert torch.equal(Backbone.slots_from_mask(batch["special_tokens_mask"]), backbone.special_slots(encoded[:2]))


# --------------------------------------------------------------------------- validation and budget


def test_validation_split_is_disjoint_from_training_rows_and_from_eval(tmp_path):
    from training.trainer import load_data

    rows = SENTENCES * 3 + [(f"sentence number {i}", str(i % 2)) for i in range(40)] + [EVAL_SENTENCES[2]]
    train_file, eval_file = _write_sst(tmp_path, rows), _write_eval(tmp_path)
    settings = TrainSettings(method="lora", task_type="sequence-classification", train=str(train_file),
                             eval=str(eval_file), val_fraction=0.25)
    train_rows, val_rows, eval_rows, source = load_data(settings)
    key = lambda e: (e.text, e.pair)  # noqa: E731
    assert val_rows and len(train_rows) + len(val_rows) == len(rows)
    assert not {key(e) for e in val_rows} & {key(e) for e in train_rows}  # repeated sentences stay on one side
    assert not {key(e) for e in val_rows} & {key(e) for e in eval_rows}
    assert abs(len(val_rows) - 0.25 * len(rows)) <= 3 and "carved" in source
    assert load_data(settings)[1] == val_rows  # seeded
    # a --val file is the validation set, and its inputs leave the training side
    val_file = _write_sst(tmp_path, SENTENCES[:2], "val.tsv")
    settings.val = str(val_file)
    train_rows, val_rows, _, source = load_data(settings)
    assert [key(e) for e in val_rows] == [(t, None) for t, _ in SENTENCES[:2]] and "--val file" in source
    assert not {key(e) for e in val_rows} & {key(e) for e in train_rows}


def test_the_budget_runs_to_its_end_and_keeps_an_epoch_of_its_annealed_part(tmp_path, tiny_folder):
    data, evaluation = _write_sst(tmp_path), _write_eval(tmp_path)
    report = tmp_path / "r.json"
    # nothing can change at learning rate 0: no drop stops it, and every epoch scores the same
    rc = main(["train", "--method", "lora", "--train", str(data), "--eval", str(evaluation), "--task-type",
               "sequence-classification", "--backbone", str(tiny_folder), "--lr", "0", "--head-lr", "0",
               "--epochs", "4", "--batch-size", "4", "--report", str(report), "--quiet"])
    assert rc == 0
    rep = json.loads(report.read_text())
    assert rep["epochs"] == 4 and len(rep["history"]) == 4
    assert rep["best_epoch"] == 2  # the first epoch of the annealed half, not epoch 1
    assert "the rate reached 0" in rep["stopped"][0] and "annealed" in rep["budget"]
    assert rep["steps"] == 4 * -(-rep["train_examples"] // 4)


@pytest.mark.parametrize("method", ["pasta", "dsee"])
def test_served_delta_reproduces_the_reported_metric(tmp_path, tiny_folder, method):
    from server.delta import prepare_delta
    from server.engine import Engine, Row

    data, evaluation = _write_sst(tmp_path), _write_eval(tmp_path)
    out, report = tmp_path / "d.safetensors", tmp_path / "r.json"
    rc = main(["train", "--method", method, "--train", str(data), "--eval", str(evaluation), "--task-type",
               "sequence-classification", "--backbone", str(tiny_folder), "--epochs", "2", "--lr", "0.05",
               "--batch-size", "4", "--out", str(out), "--report", str(report), "--quiet"])
    assert rc == 0
    rep = json.loads(report.read_text())
    if method == "dsee":
        assert [h["phase"] for h in rep["history"]] == ["dense"] * 2 + ["retrain"] * 3
        assert rep["best_epoch"] >= 3  # only the pruned model is exported
    backbone = Backbone.load(tiny_folder, device="cpu")
    engine = Engine(backbone)
    prepared = prepare_delta(out.read_bytes(), backbone, name="t", version=1)
    encoded = backbone.encode([t for t, _ in EVAL_SENTENCES], prepared.meta.max_length)
    logits = engine.forward([Row(delta=prepared, text=e) for e in encoded])
    predicted = [prepared.meta.labels[int(x.argmax())] for x in logits]
    served = sum(p == y for p, (_, y) in zip(predicted, EVAL_SENTENCES, strict=True)) / len(EVAL_SENTENCES)
    assert served == rep["eval_accuracy"]


def test_served_over_http_reproduces_the_reported_metrics(tmp_path, tiny_folder):
    """`bench.served_accuracy`: a real server, the deltas PUT over HTTP, the eval files sent as predicts."""
    from bench.served_accuracy import measure

    data, evaluation = _write_sst(tmp_path), _write_eval(tmp_path)
    conll = tmp_path / "ner.txt"
    conll.write_text("\n\n".join("\n".join(f"{w} NN {t}" for w, t in zip(words, tags, strict=True))
                                 for words, tags in NER * 3) + "\n")
    conll_eval = tmp_path / "ner-eval.txt"  # "U.S." comes back from the server as several words
    conll_eval.write_text("Anna NN B-PER\nvisited NN O\nthe NN O\nU.S. NN B-LOC\n\nRome NN B-LOC\nwas NN O\n")
    runs = [("pasta", data, evaluation, "sequence-classification", ["--label-names", "negative,positive"]),
            ("lora", conll, conll_eval, "token-classification", []),
            # mean pooling (task-delta.md's metadata pooling=mean): the server must pool as the trainer did
            ("mask", data, evaluation, "sequence-classification", ["--pooling", "mean"])]
    reports = []
    for method, train_file, eval_file, task_type, extra in runs:
        report = tmp_path / f"{method}.json"
        assert main(["train", "--method", method, "--train", str(train_file), "--eval", str(eval_file),
                     "--task-type", task_type, "--backbone", str(tiny_folder), "--epochs", "2", "--lr", "0.05",
                     "--batch-size", "4", "--out", str(tmp_path / f"{method}.safetensors"), "--report", str(report),
                     "--quiet", *extra]) == 0
        reports.append(report)
    assert json.loads(reports[2].read_text())["pooling"] == "mean"
    rows = measure(reports, batch=3, server_args=["--backbone", str(tiny_folder)])
    assert [row["task"] for row in rows] == ["pasta", "lora", "mask"]
    for row in rows:
        assert row["trained"].keys() == row["served"].keys() and row["served"]
        for metric, value in row["served"].items():
            assert value == pytest.approx(row["trained"][metric], abs=1e-12), (row["task"], metric)
