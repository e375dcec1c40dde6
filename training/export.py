"""Write a task delta out as a standard transformers model folder (`deltaserve export`).

No lock-in: the backbone with a delta folded in is an ordinary `…ForSequenceClassification` or
`…ForTokenClassification`. Every linear weight becomes `W' = W ⊙ K + B·A + S`
(`TaskDelta.dense_weight`, the registered parts' dense effects) and its bias `b + δb`, LayerNorm
deltas go into the LayerNorms and the embedding shift into the position and token-type tables
(rows of equal effect: both are added before the embeddings' LayerNorm), pruned heads become zero input
columns of their attention output projection, the task head goes where the family's class keeps
it (BERT: the pooler and `classifier`; RoBERTa/MPNet: `classifier.dense` and `classifier.out_proj`),
labels into `id2label`, the backbone's tokenizer alongside, its `model_max_length` set to the
length the server truncates to. `transformers.pipeline` then answers as the server does.

An `embedding` delta becomes a sentence-transformers folder instead (the folded encoder, its
pooling, the projection as a `Dense` with no activation, `Normalize` unless `normalize` is false),
which `SentenceTransformer(folder).encode` answers as the server does.

What a standard class cannot express is refused with the reason: PASTA vectors (added to
special tokens' hidden states before every layer: no transformers class has them), mean
pooling in a classification model, a first-token classifier with no pooler on BERT (whose class
always applies its pooler), DistilBERT's ReLU head.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from adapters_store.format import TaskDelta
from server.backbone import Backbone


class ExportError(ValueError):
    """The delta holds something a standard transformers class cannot express; the message says what."""


_CLASS_PREFIX = {"bert": "Bert", "roberta": "Roberta", "xlm-roberta": "XLMRoberta", "camembert": "Camembert",
                 "mpnet": "MPNet", "distilbert": "DistilBert"}
_DENSE_HEAD = ("roberta", "xlm-roberta", "camembert", "mpnet")


def _model_class(model_type: str, task_type: str) -> type:
    import transformers

    suffix = "ForTokenClassification" if task_type == "token-classification" else "ForSequenceClassification"
    return getattr(transformers, _CLASS_PREFIX[model_type] + suffix)


def check_exportable(delta: TaskDelta, backbone: Backbone) -> None:
    """Raise `ExportError` naming why when no standard class (transformers, or sentence-transformers for an
    embedding) computes this delta."""
    if delta.pasta is not None:
        raise ExportError("PASTA vectors are added to the special tokens' hidden states before every layer; no "
                          "transformers model class has such a step, so this delta cannot be exported")
    if backbone.model_type not in _CLASS_PREFIX:
        raise ExportError(f"no transformers classification class known for {backbone.model_type!r}")
    if delta.meta.is_embedding:
        return  # a sentence-transformers folder: Transformer, Pooling (cls or mean), Dense, Normalize
    if delta.meta.mean_pooling:
        raise ExportError("mean pooling in a classification model: transformers' …ForSequenceClassification "
                          "classes read the first token, and sentence-transformers has no standard classifier "
                          "module, so this delta cannot be exported")
    if delta.meta.task_type == "sequence-classification":
        if backbone.model_type == "distilbert":
            raise ExportError("DistilBERT's sequence classifier applies pre_classifier + ReLU; a delta's head is "
                              "dense + tanh (or none), which that class cannot express")
        has_pooler = delta.head.pooler_weight is not None or backbone.has_pooler
        if not has_pooler:
            raise ExportError("this delta classifies the first token's hidden state directly (no pooler in the "
                              "delta or the backbone); transformers' sequence classifiers always apply a dense + "
                              "tanh first")


# Families whose position table starts after the padding index (position ids pad_token_id + 1 + p).
PADDED_POSITIONS = ("roberta", "xlm-roberta", "camembert", "mpnet")


def folded_state(delta: TaskDelta, backbone: Backbone) -> dict[str, torch.Tensor]:
    """The backbone's state dict with the delta folded in: W ⊙ K + B·A + S, b + δb, LayerNorm deltas, the
    embedding shift (into the position and token-type tables), pruned heads' columns zeroed."""
    state = {k: v.detach().float().cpu().clone() for k, v in backbone.model.state_dict().items()}
    for module in delta.modules():
        state[f"{module}.weight"] = delta.dense_weight(module, state[f"{module}.weight"])
        if module in delta.bias:
            if f"{module}.bias" not in state:
                raise ExportError(f"{module}.bias_delta: the backbone's {module} has no bias, so a standard "
                                  "model of this architecture cannot carry one")
            state[f"{module}.bias"] = delta.dense_bias(module, state[f"{module}.bias"])  # type: ignore[assignment]
    for name, norm in delta.norms.items():
        if norm.weight is not None:
            state[f"{name}.weight"] = state[f"{name}.weight"] + norm.weight.float()
        if norm.bias is not None:
            state[f"{name}.bias"] = state[f"{name}.bias"] + norm.bias.float()
    shift = delta.embedding_shift
    if shift is not None and shift.position is not None:
        # Sequence position p reads row p of the table, after the padding index in RoBERTa's families.
        offset = backbone.model.config.pad_token_id + 1 if backbone.model_type in PADDED_POSITIONS else 0
        key = "embeddings.position_embeddings.weight"
        rows = shift.position.float()
        state[key] = state[key].clone()
        state[key][offset:offset + rows.shape[0]] += rows
    if shift is not None and shift.token_type is not None:
        key = "embeddings.token_type_embeddings.weight"
        state[key] = state[key] + shift.token_type.float()
    for layer, head_keep in delta.head_keep.items():
        name = f"{backbone.attention_output_modules[layer]}.weight"
        columns = head_keep.keep.to(torch.float32).repeat_interleave(backbone.head_dim)
        state[name] = state[name] * columns
    return state


def folded_model(delta: TaskDelta, backbone: Backbone) -> nn.Module:
    """The standard transformers model computing `delta` on `backbone` (float32, CPU, eval)."""
    check_exportable(delta, backbone)
    meta = delta.meta
    regression = meta.is_regression
    config = backbone.model.config.__class__.from_dict(backbone.model.config.to_dict())
    config.num_labels = len(meta.labels)
    config.id2label = {i: label for i, label in enumerate(meta.labels)}
    config.label2id = {label: i for i, label in enumerate(meta.labels)}
    config.problem_type = "regression" if regression else "single_label_classification"
    config.architectures = [_model_class(backbone.model_type, meta.task_type).__name__]
    model = _model_class(backbone.model_type, meta.task_type)(config).float().eval()
    base = model.base_model
    state = folded_state(delta, backbone)
    head = delta.head
    if meta.task_type == "sequence-classification":
        if backbone.model_type in _DENSE_HEAD:
            if head.pooler_weight is not None and head.pooler_bias is not None:
                pw, pb = head.pooler_weight, head.pooler_bias
            else:  # the backbone's pooler (with the delta's parts on pooler.dense, already folded)
                pw, pb = state["pooler.dense.weight"], state["pooler.dense.bias"]
            dense_head = {"dense.weight": pw, "dense.bias": pb, "out_proj.weight": head.classifier_weight,
                          "out_proj.bias": head.classifier_bias}
            model.classifier.load_state_dict({k: v.float() for k, v in dense_head.items()})
            state = {k: v for k, v in state.items() if not k.startswith("pooler.")}
        else:
            if head.pooler_weight is not None and head.pooler_bias is not None:
                state["pooler.dense.weight"], state["pooler.dense.bias"] = head.pooler_weight, head.pooler_bias
            model.classifier.load_state_dict({"weight": head.classifier_weight.float(),
                                              "bias": head.classifier_bias.float()})
    else:
        state = {k: v for k, v in state.items() if not k.startswith("pooler.")}
        model.classifier.load_state_dict({"weight": head.classifier_weight.float(),
                                          "bias": head.classifier_bias.float()})
    result = base.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    unexpected = [k for k in result.unexpected_keys]
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if unexpected or missing:
        raise ExportError(f"the backbone's weights do not fit {type(model).__name__}: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}")
    return model.eval()


def _save_sentence_transformer(delta: TaskDelta, backbone: Backbone, folder: Path) -> None:
    """An embedding delta as a sentence-transformers folder: the folded encoder, its pooling (cls or mean),
    the projection as a Dense with no activation, Normalize unless `normalize` is false."""
    try:
        from sentence_transformers import SentenceTransformer, models
    except ImportError:
        raise ExportError("an embedding delta exports as a sentence-transformers folder: pip install "
                          "sentence-transformers") from None
    encoder = backbone.model.__class__(backbone.model.config)
    missing, unexpected = encoder.load_state_dict(folded_state(delta, backbone), strict=False)
    if [k for k in missing if not k.endswith("position_ids")] or unexpected:
        raise ExportError(f"the folded weights do not fit {type(encoder).__name__}: {missing[:3]} {unexpected[:3]}")
    raw = folder / ".encoder"
    encoder.eval().save_pretrained(raw)
    backbone.tokenizer.save_pretrained(raw)
    max_length = delta.meta.max_length or backbone.max_length
    transformer = models.Transformer(str(raw), max_seq_length=max_length)
    modules: list[nn.Module] = [transformer, models.Pooling(backbone.hidden_size, pooling_mode=delta.meta.pooling)]
    head = delta.head
    if head.projection_weight is not None and head.projection_bias is not None:
        out_size = head.projection_weight.shape[0]
        dense = models.Dense(backbone.hidden_size, out_size, bias=True, activation_function=nn.Identity())
        with torch.no_grad():
            dense.linear.weight.copy_(head.projection_weight.float())
            dense.linear.bias.copy_(head.projection_bias.float())
        modules.append(dense)
    if delta.meta.normalize:
        modules.append(models.Normalize())
    SentenceTransformer(modules=modules, device="cpu").save(str(folder))
    shutil.rmtree(raw)


def export_delta(delta: TaskDelta, backbone: Backbone, out_dir: str | Path, *, force: bool = False) -> Path:
    """Write the folder (model, config with id2label, tokenizer); all or nothing."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not force:
        raise ExportError(f"{out}: exists and is not empty (pass --force to replace it)")
    check_exportable(delta, backbone)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if delta.meta.is_embedding:
            _save_sentence_transformer(delta, backbone, staging)
        else:
            folded_model(delta, backbone).save_pretrained(staging)
            tokenizer = backbone.tokenizer
            saved_max = tokenizer.model_max_length
            tokenizer.model_max_length = delta.meta.max_length or backbone.max_length  # the server's truncation
            try:
                tokenizer.save_pretrained(staging)
            finally:
                tokenizer.model_max_length = saved_max
        (staging / "deltaserve.json").write_text(json.dumps({
            "exported_from": "deltaserve", "method": delta.meta.method, "task_type": delta.meta.task_type,
            "backbone_fingerprint": delta.meta.backbone_fingerprint, "word_piece": delta.meta.word_piece,
            "description": delta.meta.description}, indent=2))
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
