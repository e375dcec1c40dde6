"""Training building blocks: GreBsmo, DSEE pruning, readers, metrics."""

from __future__ import annotations

import json

import pytest
import torch

from server.backbone import LAYER_ROLES
from tests.conftest import make_tiny_backbone, shared_data_or_skip
from training.data import label_set, read_conll, read_examples
from training.grebsmo import grebsmo, sparse_support
from training.methods.dsee import Dsee, DseeConfig, heads_to_drop, smallest_fraction
from training.methods.lora import add_low_rank
from training.metrics import binary_f1, entities, entity_f1, mcc
from training.model import DeltaModel


def test_grebsmo_recovers_planted_low_rank_plus_sparse():
    gen = torch.Generator().manual_seed(0)
    m, n, rank = 60, 40, 3
    low = torch.randn(m, rank, generator=gen, dtype=torch.float64) @ torch.randn(rank, n, generator=gen,
                                                                               dtype=torch.float64)
    support = torch.randperm(m * n, generator=gen)[:30]
    spikes = torch.zeros(m * n, dtype=torch.float64)
    spikes[support] = (torch.rand(30, generator=gen, dtype=torch.float64) * 5 + 5) * torch.sign(
        torch.randn(30, generator=gen, dtype=torch.float64))
    X = low + spikes.view(m, n)
    L, S = grebsmo(X, rank)
    assert torch.linalg.norm(L - low) / torch.linalg.norm(low) < 0.05
    assert set(torch.topk(S.abs().reshape(-1), 30).indices.tolist()) == set(support.tolist())
    assert sparse_support(X, 30, rank).tolist() == sorted(support.tolist())


def test_smallest_fraction_prunes_exactly_the_ratio():
    gen = torch.Generator().manual_seed(1)
    scores = {"a": torch.rand(7, 13, generator=gen), "b": torch.rand(5, 3, generator=gen)}
    for ratio in (0.0, 0.2, 0.37, 1.0):
        masks = smallest_fraction(scores, ratio)
        dropped = sum(int((~m).sum()) for m in masks.values())
        assert dropped == round(ratio * (7 * 13 + 5 * 3))
        kept = torch.cat([scores[k][masks[k]] for k in scores])
        gone = torch.cat([scores[k][~masks[k]] for k in scores])
        if kept.numel() and gone.numel():
            assert gone.max() <= kept.min()


@pytest.mark.parametrize("targets", [("query", "value"), LAYER_ROLES])
def test_dsee_unstructured_pruning_ratio_is_exact_per_group(tokenizer, targets):
    backbone = make_tiny_backbone(tokenizer)
    model = DeltaModel(backbone, "sequence-classification", 2)
    method = Dsee(DseeConfig(targets=targets, ratio=0.2, sparse_k=4))
    method.setup(model, None)  # type: ignore[arg-type]
    with torch.no_grad():
        for module in model.deltas.values():
            module.parts["low_rank"].B.normal_()
    method.before_phase(model, 1)
    adapted = set(method.adapted(model))
    for group in (adapted, set(model.deltas) - adapted):
        total = sum(model.deltas[n].weight.numel() for n in group)
        dropped = sum(int((~model.deltas[n].keep_mask()).sum()) for n in group)  # type: ignore[operator]
        assert dropped == round(0.2 * total)
    assert all(not name.startswith("pooler") for name in model.deltas)


def test_head_pruning_removes_the_heads_with_the_smallest_update(tokenizer):
    backbone = make_tiny_backbone(tokenizer)  # 4 heads of 8 dims
    dq, dv = torch.ones(32, 32), torch.ones(32, 32)
    dq[8:16] = 0.01  # head 1 barely changed in q and v
    dv[8:16] = 0.01
    dv[24:32] = 0.1  # head 3 second smallest
    assert heads_to_drop(dq, dv, 4, 1) == [1]
    assert heads_to_drop(dq, dv, 4, 2) == [1, 3]

    model = DeltaModel(backbone, "sequence-classification", 2)
    method = Dsee(DseeConfig(prune="structured", heads=1, sparse_k=4))
    method.setup(model, None)  # type: ignore[arg-type]
    with torch.no_grad():
        for layer in range(backbone.num_layers):
            for role in ("query", "value"):
                module = model.deltas[model.layer_module(layer, role)]
                module.parts["low_rank"].B.fill_(1.0)
                module.parts["low_rank"].B[8 * layer:8 * layer + 8] = 0.0
                module.parts["sparse"].value.zero_()
    method.before_phase(model, 1)
    for layer in range(backbone.num_layers):
        expected = [1] * 4
        expected[layer] = 0
        assert model.head_keep[layer].tolist() == expected
        columns = model.deltas[model.layer_module(layer, "attention_output")].input_keep
        assert columns is not None and columns[8 * layer:8 * layer + 8].sum() == 0 and columns.sum() == 24


def test_lora_scale_is_alpha_over_rank(tokenizer):
    backbone = make_tiny_backbone(tokenizer)
    model = DeltaModel(backbone, "sequence-classification", 2)
    module = model.wrap(model.layer_module(0, "query"))
    low_rank = add_low_rank(module, 4, 16)
    with torch.no_grad():
        low_rank.B.normal_()
    expected = module.weight + 4.0 * low_rank.B @ low_rank.A
    assert torch.allclose(module.effective_weight(), expected, atol=1e-6)


# --------------------------------------------------------------------------- readers


def test_reads_tsv_csv_jsonl(tmp_path):
    (tmp_path / "a.tsv").write_text('\ufeffsentence\tlabel\nhe said "hi\tpos\nno\tneg\n')
    (tmp_path / "a.csv").write_text('text,label\n"a, b",pos\nc,neg\n')
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "x", "label": 1}) + "\n" + json.dumps(
        {"text": "y", "label": 0}) + "\n")
    tsv = read_examples(tmp_path / "a.tsv", "sequence-classification")
    assert tsv[0].text == 'he said "hi' and tsv[0].label == "pos"
    assert read_examples(tmp_path / "a.csv", "sequence-classification")[0].text == "a, b"
    jsonl = read_examples(tmp_path / "a.jsonl", "sequence-classification")
    assert label_set(jsonl) == ["0", "1"]
    by_index = read_examples(tmp_path / "a.tsv", "sequence-classification", text_column="0", label_column="1")
    assert by_index == tsv


def test_labels_sort_numerically():
    from training.data import Example

    assert label_set([Example("a", None, str(i)) for i in (10, 2, 1)]) == ["1", "2", "10"]


def test_reads_real_mrpc():
    path = shared_data_or_skip("mrpc", "dev.tsv")
    rows = read_examples(path, "sequence-classification", "#1 String", "#2 String", "Quality")
    assert len(rows) == 408 and rows[0].pair and label_set(rows) == ["0", "1"]


def test_reads_conll(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("-DOCSTART- -X- -X- O\n\nEU NNP B-ORG\nrejects VBZ O\n\nPeter NNP B-PER\n")
    rows = read_conll(path)
    assert [r.text for r in rows] == [("EU", "rejects"), ("Peter",)]
    assert rows[0].label == ("B-ORG", "O")


# --------------------------------------------------------------------------- metrics


def test_entities_follow_conlleval():
    assert entities(["B-PER", "I-PER", "O", "I-LOC", "I-LOC", "B-LOC"]) == {(0, 2, "PER"), (3, 5, "LOC"),
                                                                          (5, 6, "LOC")}
    assert entities(["B-PER", "I-LOC"]) == {(0, 1, "PER"), (1, 2, "LOC")}
    scores = entity_f1([["B-PER", "I-PER", "O", "B-LOC"]], [["B-PER", "I-PER", "O", "B-ORG"]])
    assert scores["precision"] == pytest.approx(0.5) and scores["f1"] == pytest.approx(0.5)


def test_binary_metrics():
    gold, pred = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]
    assert binary_f1(gold, pred) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert mcc(gold, gold, 2) == pytest.approx(1.0)
    assert mcc(gold, [1 - g for g in gold], 2) == pytest.approx(-1.0)
    assert mcc(gold, pred, 2) == pytest.approx((2 * 1 - 1 * 1) / ((3 * 3 * 2 * 2) ** 0.5))


def test_results_compare_each_method_with_finetuning_on_the_headline_metric():
    from training.results import against_finetuning

    def report(task, method, f1, accuracy, seconds):
        return {"task": task, "method": method, "eval_f1": f1, "eval_accuracy": accuracy,
                "train_seconds": seconds, "train_cpu_seconds": seconds, "settings": {"task_type": "x"}}

    text = against_finetuning([report("mrpc", "finetune", 0.90, 0.80, 100), report("mrpc", "pasta", 0.885, 0.70, 150),
                               report("mrpc", "lora", 0.885, 0.95, 250), report("sst2", "mask", 0.5, 0.5, 1)])
    rows = [line.split(" | ") for line in text.splitlines()[2:]]
    assert len(rows) == 2  # no fine-tuning run for sst2: nothing to compare with
    pasta, lora = rows
    assert pasta[1:7] == ["f1", "pasta", "88.50", "90.00", "-1.50", "✓ (≥ −2.0)"]  # MRPC is judged on F1
    assert lora[5:8] == ["-1.50", "✗ (≥ −1.0)", "2.50 ✗"]
