"""`deltaserve import-peft`: an adapter made by the `peft` library converts to a delta whose
forward (trainer's and engine's) equals PEFT's own."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapters_store.format import parse_delta
from server.backbone import Backbone
from training.cli import main
from training.model import model_from_delta

peft = pytest.importorskip("peft")

TEXTS = ["a gripping , funny film", "dull", "The cat sat on the mat . It was an [UNK] cat"]


def _tiny_config():
    from transformers import BertConfig

    return BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                      max_position_embeddings=128, vocab_size=30522, pad_token_id=0, num_labels=3)


def _peft_model(tmp_path: Path, tokenizer, task: str, **lora):
    from transformers import BertForSequenceClassification, BertForTokenClassification

    torch.manual_seed(0)
    cls = BertForSequenceClassification if task == "SEQ_CLS" else BertForTokenClassification
    model = cls(_tiny_config()).eval()
    base_dir = tmp_path / "base"
    model.bert.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    config = peft.LoraConfig(task_type=task, **lora)
    peft_model = peft.get_peft_model(model, config)
    with torch.no_grad():  # as if trained: B and the head away from their initial values
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "classifier" in name:
                param.add_(torch.randn_like(param) * 0.1)
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    return peft_model.eval(), base_dir, adapter_dir


@pytest.mark.parametrize(("task", "lora"), [
    ("SEQ_CLS", {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]}),
    ("SEQ_CLS", {"r": 4, "lora_alpha": 8, "use_rslora": True,
                 "target_modules": ["query", "key", "dense"]}),
    ("TOKEN_CLS", {"r": 2, "lora_alpha": 16, "target_modules": ["value", "intermediate.dense"]}),
    # Patterns of both shapes, as PEFT matches them (against the full name, `bert.` included): a full module
    # name, a suffix, a regular expression; the first matching key wins.
    ("SEQ_CLS", {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"],
                 "alpha_pattern": {"bert.encoder.layer.0.attention.self.query": 32,
                                   r"layer\.[12]\.attention\.self\.value": 2, "value": 5},
                 "rank_pattern": {"bert.encoder.layer.1.attention.self.query": 2, "layer.2.attention.self.value": 6}}),
    ("TOKEN_CLS", {"r": 2, "lora_alpha": 4, "target_modules": ["query", "intermediate.dense"],
                   "alpha_pattern": {"bert.encoder.layer.2.intermediate.dense": 64, "attention.self.query": 1},
                   "rank_pattern": {"bert.encoder.layer.0.intermediate.dense": 3}}),
])
def test_import_peft_matches_peft_forward(tmp_path, tokenizer, task, lora):
    peft_model, base_dir, adapter_dir = _peft_model(tmp_path, tokenizer, task, **lora)
    out = tmp_path / "delta.safetensors"
    assert main(["import-peft", str(adapter_dir), "--out", str(out), "--backbone", str(base_dir),
                 "--labels", "a,b,c"]) == 0
    backbone = Backbone.load(base_dir, device="cpu")
    delta = parse_delta(out.read_bytes(), backbone.spec())
    assert delta.low_rank and delta.meta.labels == ("a", "b", "c")
    model = model_from_delta(backbone, delta)

    encoded = backbone.encode(TEXTS, 64)
    from server.delta import prepare_delta
    from server.engine import Engine, Row

    served = Backbone.load(base_dir, device="cpu")
    engine = Engine(served)
    rows = [Row(delta=prepare_delta(out.read_bytes(), served, name="p", version=1), text=e) for e in encoded]
    engine_out = engine.forward(rows)
    for text, served_logits in zip(encoded, engine_out, strict=True):
        ids = torch.tensor([text.input_ids])
        types = torch.tensor([text.token_type_ids])
        with torch.no_grad():
            expected = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=types).logits[0]
            ours = model(ids, torch.ones_like(ids), types)[0]
        assert torch.allclose(ours, expected, atol=1e-5), (ours - expected).abs().max()
        assert torch.allclose(served_logits, expected, atol=1e-5), (served_logits - expected).abs().max()


def test_import_peft_refuses_what_a_delta_cannot_hold(tmp_path, tokenizer):
    from training.peft_import import PeftImportError, import_peft

    _, base_dir, adapter_dir = _peft_model(tmp_path, tokenizer, "SEQ_CLS", r=2, lora_alpha=4,
                                           target_modules=["query"], bias="lora_only")
    with pytest.raises(PeftImportError, match="cannot carry"):
        import_peft(adapter_dir, Backbone.load(base_dir, device="cpu"))
