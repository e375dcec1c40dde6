"""Convert a PEFT LoRA adapter folder into a task delta.

Reads `adapter_config.json` and `adapter_model.safetensors`, folds the scale (alpha/r, or
alpha/sqrt(r) with rsLoRA, per-module rank/alpha patterns matched as PEFT matches them, against the
full module name) into B, maps PEFT's key
names (`base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight`) to the
backbone's module names, and takes the head from `modules_to_save` (`classifier`, and for
RoBERTa's head `classifier.dense` as the task pooler + `classifier.out_proj`). Anything the
delta format cannot express (DoRA, trained biases, embeddings, other heads) is refused.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from adapters_store.format import DeltaMeta, LowRank, TaskDelta, TaskHead
from server.backbone import Backbone

PEFT_TASK_TYPES = {"SEQ_CLS": "sequence-classification", "TOKEN_CLS": "token-classification"}
BASE_PREFIXES = ("bert.", "roberta.", "distilbert.", "mpnet.", "xlm_roberta.", "camembert.")
HEAD_KEYS = {
    "classifier.weight": "head.classifier.weight",
    "classifier.bias": "head.classifier.bias",
    "classifier.out_proj.weight": "head.classifier.weight",
    "classifier.out_proj.bias": "head.classifier.bias",
    "classifier.dense.weight": "head.pooler.weight",
    "classifier.dense.bias": "head.pooler.bias",
}
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[A-Za-z0-9_]+)?\.weight$")


class PeftImportError(ValueError):
    """The adapter uses something a task delta cannot express."""


def _pattern_value(patterns: dict, full_module: str, default: float) -> float:
    """The value of the first pattern matching the module as PEFT matches it (`peft.utils.other.get_pattern_key`):
    a regular expression for the end of the *full* module name (`bert.encoder.layer.0.attention.self.query`,
    model prefix included), starting at a dot boundary; the first key in the config's order wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", full_module):
            return value
    return default


def _peft_name(key: str) -> str:
    """A saved key as the module names PEFT saw: `base_model.model.` and the wrapper parts dropped."""
    key = key.removeprefix("base_model.model.")
    return key.replace(".modules_to_save.default.", ".").replace(".original_module.", ".")


def _strip(name: str) -> str:
    """A PEFT module name as the backbone's: the task model's prefix (`bert.`, `roberta.`, ...) dropped."""
    for prefix in BASE_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def import_peft(folder: str | Path, backbone: Backbone, *, labels: list[str] | None = None,
                task_type: str | None = None, max_length: int | None = None) -> TaskDelta:
    folder = Path(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise PeftImportError(f"only LoRA adapters convert; this one is {config.get('peft_type')}")
    if config.get("use_dora"):
        raise PeftImportError("DoRA rescales the whole weight; the delta format cannot express it")
    if config.get("fan_in_fan_out"):
        raise PeftImportError("fan_in_fan_out (Conv1D) layers are not part of supported backbones")
    weights_path = folder / "adapter_model.safetensors"
    if not weights_path.exists():
        raise PeftImportError(f"{weights_path} not found (only safetensors adapters are read)")
    tensors = load_file(str(weights_path))
    task_type = task_type or PEFT_TASK_TYPES.get(str(config.get("task_type")), "")
    if task_type not in PEFT_TASK_TYPES.values():
        raise PeftImportError("cannot tell the task type from adapter_config.json; pass --task-type")

    pieces: dict[str, dict[str, torch.Tensor]] = {}
    full_names: dict[str, str] = {}  # backbone module -> the name PEFT matched its patterns against
    head: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        full = _peft_name(key)
        name = _strip(full)
        match = _LORA_KEY.match(name)
        if match:
            module = match.group("module")
            if module not in backbone.linear_modules:
                raise PeftImportError(f"{key}: the backbone has no linear module {module!r}")
            pieces.setdefault(module, {})[match.group("part")] = tensor.float()
            full_names[module] = _LORA_KEY.match(full).group("module")  # type: ignore[union-attr]
        elif name in HEAD_KEYS:
            head[HEAD_KEYS[name]] = tensor.float()
        else:
            raise PeftImportError(f"{key}: not a LoRA weight or classifier; a task delta cannot carry it")

    rank_default, alpha_default = config.get("r", 8), config.get("lora_alpha", 8)
    low_rank: dict[str, LowRank] = {}
    for module, parts in sorted(pieces.items()):
        if set(parts) != {"A", "B"}:
            raise PeftImportError(f"{module}: lora_A and lora_B must both be present")
        rank = parts["A"].shape[0]
        alpha = _pattern_value(config.get("alpha_pattern") or {}, full_names[module], alpha_default)
        declared = _pattern_value(config.get("rank_pattern") or {}, full_names[module], rank_default)
        if declared != rank:
            raise PeftImportError(f"{module}: rank {rank} in the weights but {declared} in the config")
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        low_rank[module] = LowRank(module, parts["A"].contiguous(), (parts["B"] * scale).contiguous())

    if "head.classifier.weight" not in head or "head.classifier.bias" not in head:
        raise PeftImportError("no classifier in modules_to_save: a task delta needs its head")
    num_labels = head["head.classifier.weight"].shape[0]
    labels = labels or [f"LABEL_{i}" for i in range(num_labels)]
    if len(labels) != num_labels:
        raise PeftImportError(f"{len(labels)} labels given but the classifier has {num_labels} outputs")
    meta = DeltaMeta(method="lora", task_type=task_type, labels=tuple(labels),  # type: ignore[arg-type]
                     backbone_fingerprint=backbone.fingerprint, max_length=max_length,
                     description=f"imported from PEFT adapter {folder.name}")
    task_head = TaskHead(head["head.classifier.weight"], head["head.classifier.bias"],
                         head.get("head.pooler.weight"), head.get("head.pooler.bias"))
    return TaskDelta.from_parts(meta, task_head, low_rank.values())
