"""The trainer's readout, budget and precision (issue 18): mean pooling as the backbone was trained,
the readout in its own parameter group, an annealed budget whose kept epoch comes from its annealed
part and which stops early only on a real drop, DSEE pruned by magnitude, float32 master weights
on a CUDA-asked backbone, and the sweep script's grid and table. Tiny backbones throughout.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import training.trainer as trainer
from adapters_store.format import parse_delta
from server.backbone import Backbone
from server.pooling import mean_pool
from tests.conftest import make_tiny_backbone, make_tiny_model
from tests.test_train import (
    EVAL_SENTENCES,
    METHODS,
    SENTENCES,
    _write_eval,
    _write_sst,
    method_args,
    setup,
)
from training import sweep
from training.cli import main
from training.data import Example, encode
from training.methods import make_method
from training.trainer import (
    TrainSettings,
    annealed_from,
    build_model,
    fit_head,
    loss_fn,
    optimizer_for,
    readout_parameters,
    schedule,
    validation_noise,
)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tokenizer) -> Path:
    """A tiny backbone saved without a pooling config (pooling defaults to `cls`)."""
    folder = tmp_path_factory.mktemp("tiny-cls")
    make_tiny_model("bert").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def mean_folder(tmp_path_factory, tokenizer) -> Path:
    """A tiny backbone saved with a sentence-transformers pooling config saying `mean`."""
    folder = tmp_path_factory.mktemp("tiny-mean")
    make_tiny_model("bert").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True}))
    return folder


# --------------------------------------------------------------------------- pooling


def test_mean_pooled_logits_are_the_classifier_on_the_masked_mean(tokenizer):
    """Against a plain Hugging Face forward: mean over the attention mask's ones, both texts of a pair."""
    backbone = make_tiny_backbone(tokenizer)
    reference = make_tiny_model("bert")  # the same seeded weights, untouched
    for pairs in (False, True):
        settings = TrainSettings(method="lora", task_type="sequence-classification", train="", eval="",
                                 pooling="mean")
        _, _, _, batch = setup(backbone, "lora", pairs=pairs)
        model = build_model(settings, make_method("lora", method_args()), backbone, ["0", "1"], pairs)
        with torch.no_grad():
            for p in model.trainable_parameters():
                p.add_(torch.randn_like(p) * 0.1)
            for module in model.deltas.values():  # LoRA changes the encoder: fold it into the reference
                reference.get_submodule(_relative(model, module)).weight.copy_(module.effective_weight())
            model.eval()
            got = model.run(batch)
            hidden = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               token_type_ids=batch["token_type_ids"]).last_hidden_state
            mask = batch["attention_mask"].float()
            mean = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            want = mean @ model.classifier.weight.T + model.classifier.bias
        assert torch.allclose(got, want, atol=1e-5)
        assert torch.allclose(mean_pool(hidden, batch["attention_mask"]), mean, atol=1e-6)
        assert (mask == 0).any()  # padding is there and must not count


def _relative(model, module) -> str:
    return next(name for name, m in model.deltas.items() if m is module)


def test_the_trainer_defaults_to_the_backbones_pooling_and_writes_it_into_the_delta(tmp_path, mean_folder):
    data, evaluation = _write_sst(tmp_path), _write_eval(tmp_path)
    out, report = tmp_path / "d.safetensors", tmp_path / "r.json"
    assert main(["train", "--method", "mask", "--train", str(data), "--eval", str(evaluation), "--task-type",
                 "sequence-classification", "--backbone", str(mean_folder), "--epochs", "1", "--batch-size", "4",
                 "--out", str(out), "--report", str(report), "--quiet"]) == 0
    rep = json.loads(report.read_text())
    assert rep["pooling"] == "mean"
    backbone = Backbone.load(mean_folder, device="cpu")
    delta = parse_delta(out.read_bytes(), backbone.spec())
    assert _pooling(delta.meta) == "mean"
    assert "pooler.dense" not in delta.keep  # mean pooling never reads the backbone's pooler: not masked
    # --pooling overrides the backbone's own
    assert main(["train", "--method", "pasta", "--train", str(data), "--eval", str(evaluation), "--task-type",
                 "sequence-classification", "--backbone", str(mean_folder), "--epochs", "1", "--batch-size", "4",
                 "--pooling", "cls", "--out", str(out), "--report", str(report), "--quiet"]) == 0
    assert json.loads(report.read_text())["pooling"] == "cls"
    assert _pooling(parse_delta(out.read_bytes(), backbone.spec()).meta) == "cls"


def _pooling(meta) -> str:
    return meta.pooling


def test_a_mean_pooled_delta_reloads_to_the_trainers_logits(tokenizer):
    from training.model import model_from_delta
    from training.trainer import pooling_metadata

    backbone = make_tiny_backbone(tokenizer)
    settings, m, _, batch = setup(backbone, "dsee")
    settings.pooling = "mean"
    model = build_model(settings, m, backbone, ["0", "1"], False)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    with torch.no_grad():
        trained = model.run(batch)
    from adapters_store.format import DeltaMeta

    meta = DeltaMeta(method="dsee", task_type="sequence-classification", labels=("0", "1"),
                     backbone_fingerprint=backbone.fingerprint, **pooling_metadata("sequence-classification", "mean"))
    delta = parse_delta(model.export(meta).to_bytes(), backbone.spec())
    reloaded = model_from_delta(make_tiny_backbone(tokenizer), delta)
    assert reloaded.pooling == "mean"
    with torch.no_grad():
        assert torch.allclose(reloaded.run(batch), trained, atol=1e-5)


# --------------------------------------------------------------------------- readout


@pytest.mark.parametrize("method", METHODS)
def test_the_readout_is_its_own_parameter_group_at_its_own_rate(tokenizer, method):
    backbone = make_tiny_backbone(tokenizer)
    settings, m, model, _ = setup(backbone, method, head_pooler=True)
    optimizer = optimizer_for(model, m, settings)
    groups = {g["name"]: g for g in optimizer.param_groups}
    readout = {id(p) for p in [*model.classifier.parameters(), *model.pooler.parameters()]}
    assert {id(p) for p in groups["head"]["params"]} == readout
    assert not readout & {id(p) for p in groups["body"]["params"]}
    assert len(groups["head"]["params"]) + len(groups["body"]["params"]) == len(model.trainable_parameters())
    assert groups["head"]["lr"] == (m.recipe.head_lr or m.recipe.lr) and groups["body"]["lr"] == m.recipe.lr
    settings.head_lr, settings.lr = 0.25, 0.5
    groups = {g["name"]: g for g in optimizer_for(model, m, settings, lr_scale=0.1).param_groups}
    assert math.isclose(groups["head"]["lr"], 0.025) and math.isclose(groups["body"]["lr"], 0.05)
    assert readout_parameters(model) == list(groups["head"]["params"])


def test_head_fit_gives_a_readout_that_fits_the_frozen_features(tokenizer):
    backbone = make_tiny_backbone(tokenizer)
    _, _, model, batch = setup(backbone, "pasta")
    model.eval()
    with torch.no_grad():
        before = loss_fn(model.run(batch), batch["labels"])
    data = encode([Example(t, None, y) for t, y in SENTENCES], backbone, ["0", "1"], "sequence-classification", 64)
    fitted = fit_head(model, data, 4, 2, torch.autocast("cpu", enabled=False))
    with torch.no_grad():
        after = loss_fn(model.run(batch), batch["labels"])
    assert after < before and fitted["rows"] == len(SENTENCES) and fitted["train_accuracy"] == 1.0


# --------------------------------------------------------------------------- budget


def test_the_schedule_warms_up_then_reaches_zero_at_the_end_of_the_budget():
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = schedule(optimizer, total_steps=20, warmup=4)
    rates = []
    for _ in range(20):
        rates.append(optimizer.param_groups[0]["lr"])  # the rate this step runs at
        optimizer.step()
        scheduler.step()
    assert rates[:4] == sorted(rates[:4]) and rates[3] < 1.0 and math.isclose(rates[4], 1.0)
    assert all(a > b for a, b in itertools.pairwise(rates[4:])) and rates[-1] > 0
    assert optimizer.param_groups[0]["lr"] == 0.0  # the budget's end


def test_annealed_part_and_validation_noise():
    assert [annealed_from(n, 0.5) for n in (1, 2, 3, 4, 10)] == [1, 1, 2, 2, 5]
    assert annealed_from(6, 0.0) == 1 and annealed_from(6, 1.0) == 6
    assert math.isclose(validation_noise(0.9, 1000), math.sqrt(0.09 / 1000))
    assert validation_noise(1.0, 100) > 0  # a perfect score still has a noise floor


def _scripted(monkeypatch, scores: list[float]) -> list[float]:
    """Validation scores in order (then anything for the final --eval scoring)."""
    real = trainer.evaluate
    remaining = list(scores)

    def evaluate(model, data, labels, batch_size, autocast=None):
        out = real(model, data, labels, batch_size, autocast)
        if remaining:
            out["eval_accuracy"] = remaining.pop(0)
        return out

    monkeypatch.setattr(trainer, "evaluate", evaluate)
    return remaining


def _train(tmp_path, folder, *flags: str) -> dict:
    data, evaluation = _write_sst(tmp_path, SENTENCES * 6), _write_eval(tmp_path)
    report = tmp_path / "r.json"
    assert main(["train", "--method", "pasta", "--train", str(data), "--eval", str(evaluation), "--task-type",
                 "sequence-classification", "--backbone", str(folder), "--batch-size", "4", "--report",
                 str(report), "--quiet", *flags]) == 0
    return json.loads(report.read_text())


def test_the_kept_epoch_is_the_best_of_the_annealed_part(tmp_path, tiny_folder, monkeypatch):
    _scripted(monkeypatch, [0.5, 0.9, 0.7, 0.75, 0.8, 0.72])  # epoch 2 is best, but early in the budget
    rep = _train(tmp_path, tiny_folder, "--epochs", "6", "--stop-drop", "0")
    assert rep["epochs"] == 6 and rep["best_epoch"] == 5 and rep["val_accuracy"] == 0.8
    assert rep["history"][-1]["lr_factor"] == 0.0 and "rate reached 0" in rep["stopped"][0]


def test_only_a_drop_larger_than_the_validation_noise_stops_early(tmp_path, tiny_folder, monkeypatch):
    # 6 validation rows: one standard error at 0.9 is ~0.12, so 2 SE is ~0.24
    _scripted(monkeypatch, [0.6, 0.9, 0.75, 0.8, 0.5, 0.9])
    rep = _train(tmp_path, tiny_folder, "--epochs", "6")
    assert rep["val_examples"] == 6
    assert rep["epochs"] == 5 and "stopped at epoch 5" in rep["stopped"][0]  # -0.15 went on, -0.40 stopped
    assert rep["best_epoch"] == 4  # best of the annealed part (epochs 3-6) seen before the stop


# --------------------------------------------------------------------------- DSEE


def test_dsee_prunes_by_the_magnitude_of_the_trained_weight(tokenizer):
    backbone = make_tiny_backbone(tokenizer)
    _, m, model, _ = setup(backbone, "dsee")
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.5)
    m.before_phase(model, 1)
    # one global ranking among the adapted modules: every dropped entry is below every kept one
    adapted = m.adapted(model)
    trained = {n: (model.deltas[n].weight + model.deltas[n].delta_weight()).abs() for n in adapted}
    keeps = {n: model.deltas[n].keep_mask() for n in adapted}
    dropped = torch.cat([trained[n][~keeps[n]] for n in adapted])
    kept = torch.cat([trained[n][keeps[n]] for n in adapted])
    assert dropped.max() <= kept.min()
    total = sum(model.deltas[n].weight.numel() for n in adapted)
    assert dropped.numel() == round(0.2 * total)


def test_dsee_retrains_at_a_decayed_rate_without_warm_up():
    phases = make_method("dsee", method_args()).phases(5)
    assert [p.name for p in phases] == ["dense", "retrain"]
    assert phases[1].lr_scale < 1 and not phases[1].warmup and phases[1].epochs >= 2


def test_dsee_targets_come_from_the_command_line():
    assert make_method("dsee", method_args()).config.targets == ("query", "value")  # the paper's setting
    every = make_method("dsee", method_args(dsee_targets="query,key,value,attention_output,ffn_in,ffn_out"))
    assert every.config.targets == ("query", "key", "value", "attention_output", "ffn_in", "ffn_out")


# --------------------------------------------------------------------------- precision


def test_trainables_are_float32_when_the_backbone_is_asked_for_cuda(tmp_path, tiny_folder, monkeypatch):
    """Serving defaults CUDA to float16; training must load float32. No GPU needed: the model's move
    keeps the weights on the CPU but applies the dtype the trainer asked for."""
    import server.backbone.model as backbone_module
    from server.backends import serving_dtype

    real = backbone_module.AutoModel.from_pretrained

    def from_pretrained(source, **kwargs):
        loaded = real(source, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model.to = types.MethodType(lambda self, device=None, dtype=None: nn.Module.to(self, dtype=dtype)
                                    if dtype is not None else self, model)
        return loaded

    monkeypatch.setattr(backbone_module.AutoModel, "from_pretrained", from_pretrained)
    settings = TrainSettings(method="lora", task_type="sequence-classification", train="", eval="",
                             backbone=str(tiny_folder), device="cuda")
    # what serving picks on that device, and what a backbone loaded that way holds
    served = serving_dtype(torch.device("cuda"))
    assert served == torch.float16
    assert Backbone.load(tiny_folder, device="cuda", dtype=served).dtype == torch.float16
    backbone = trainer.training_backbone(settings)
    assert backbone.device.type == "cuda" and backbone.dtype == torch.float32
    for method in METHODS:
        model = build_model(settings, make_method(method, method_args()), backbone, ["0", "1"], False)
        dtypes = {p.dtype for p in model.trainable_parameters()}
        assert dtypes == {torch.float32}, (method, dtypes)
        backbone = trainer.training_backbone(settings)  # a fresh backbone for the next method
    with pytest.raises(ValueError, match="float32"):
        build_model(settings, make_method("lora", method_args()),
                    Backbone.load(tiny_folder, device="cuda", dtype=served), ["0", "1"], False)


# --------------------------------------------------------------------------- the sweep script


def test_sweep_grid_commands_and_summary(tmp_path):
    points = sweep.parse_grid(["lr=1e-3,5e-4", "lora:lora-rank=8,16"], ["finetune", "lora", "pasta"])
    assert points["finetune"] == [()]  # the yardstick runs on its defaults
    assert len(points["lora"]) == 4 and len(points["pasta"]) == 2
    with pytest.raises(ValueError, match="not among"):
        sweep.parse_grid(["mask:lr=1"], ["lora"])
    plan = sweep.Plan(Path("/data"), tmp_path, [sweep.Run("mrpc", "lora", 43, (("lr", "1e-3"),))], {"mrpc": 500})
    cmd = sweep.command(plan, plan.runs[0])
    assert cmd[cmd.index("--text-pair-column") + 1] == "#2 String" and cmd[cmd.index("--lr") + 1] == "1e-3"
    assert cmd[cmd.index("--seed") + 1] == "43" and cmd[cmd.index("--max-train-examples") + 1] == "500"
    assert cmd[cmd.index("--threads") + 1] == "1" and cmd[cmd.index("--train") + 1] == "/data/mrpc/train.tsv"

    def report(method, seed, f1, point="defaults"):
        return {"method": method, "eval_f1": f1, "train_examples": 900, "train_cpu_seconds": 100.0,
                "eval_seconds": 0.0, "wall_seconds": 120.0, "epochs": 5, "best_epoch": 4,
                "sweep": {"task": "mrpc", "seed": seed, "point": point}}

    table = sweep.summarise([report("finetune", 1, 0.80), report("finetune", 2, 0.82),
                             report("lora", 1, 0.79, "lr=1e-3"), report("lora", 2, 0.80, "lr=1e-3")])
    row = next(line for line in table.splitlines() if "| lora |" in line)
    assert "79.50 ± 0.71" in row and "81.00 ± 1.41 (2)" in row and "-1.50" in row and "✗" in row
    # A method run on fewer seeds is compared with fine-tuning on those seeds only (the gap is paired).
    table = sweep.summarise([report("finetune", 1, 0.80), report("finetune", 2, 0.90), report("mask", 1, 0.795)])
    row = next(line for line in table.splitlines() if "| mask |" in line)
    assert "80.00 ± 0.00 (1)" in row and "-0.50" in row and "✓" in row
    assert EVAL_SENTENCES  # the shared fixtures' data is what the CLI tests above train on


def test_sweep_tags_each_report_when_its_run_ends(tmp_path, monkeypatch):
    """A finished run counts in the summary even if the sweep is stopped before its end (tagging happened
    only after the last run, so an interrupted sweep's reports were invisible to --summary)."""
    plan = sweep.Plan(Path("/data"), tmp_path, [sweep.Run("mrpc", "lora", 43), sweep.Run("mrpc", "mask", 43)])
    write = ("import json, sys; json.dump({'method': sys.argv[1], 'eval_f1': 0.8, 'train_examples': 9, "
             "'train_cpu_seconds': 1.0, 'wall_seconds': 1.0, 'epochs': 1, 'best_epoch': 1}, open(sys.argv[2], 'w'))")
    monkeypatch.setattr(sweep, "command", lambda plan, run: [sys.executable, "-c", write, run.method,
                                                               str(plan.out / f"{run.name}.json")])
    assert sweep.execute(plan, jobs=1, nice=0, dry_run=False) == []
    reports = sweep.load_reports([tmp_path])
    assert sorted(r["sweep"]["name"] for r in reports) == ["mrpc-lora-s43", "mrpc-mask-s43"]
