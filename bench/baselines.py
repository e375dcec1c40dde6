"""The three ways of serving many tasks that the engine is measured against, beside the dense ceiling.

- `TaskCopies`   — what a memory-rich server does: one full model copy per task with that task's
                   effective weights written in (W ⊙ K + B·A + S, pruned heads as zeroed input
                   columns of the attention output projection, PASTA by pre-hooks); a mixed batch
                   is split by task and each task's rows run as their own batch on their own copy.
- `NaiveSwapper` — one shared model; for each task of the batch its delta is written into the
                   shared weights in place, its rows run, and the original weights are copied back.
- `PeftMixed`    — Hugging Face PEFT's mixed-adapter batch (`adapter_names=` per row) with the same
                   LoRA deltas loaded as PEFT LoRA adapters (lora_alpha = r, so scale 1).

Effective weights are the parsed delta's `TaskDelta.dense_weight` (the registered parts' dense effects,
through the one formula `adapters_store.formula.effective_weight`), so the baselines never read a
backend's prepared parts;
PASTA slots and the layer-input hooks from `Backbone` (the same code the trainer uses).

All three take the same `PreparedDelta`s and pre-tokenised texts as the engine and return logits
per row in the caller's order, so tests can check they agree with the engine (≤ 1e-4).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from adapters_store.formula import effective_weight
from server.backbone import Backbone, EncodedText
from server.delta import PreparedDelta

Task = tuple[PreparedDelta, EncodedText]


def plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy of the backbone's HF model in which every linear module is a plain `nn.Linear`.

    The engine swaps `MixedLinear` modules in place on the backbone's model; a baseline must not
    carry them (nor their scratch buffers), so they are turned back into ordinary linears.
    """
    clone = copy.deepcopy(model)
    for name, module in list(clone.named_modules()):
        if isinstance(module, nn.Linear) and type(module) is not nn.Linear:
            Backbone.replace_module(clone, name, _plain_linear)
    return clone.eval().requires_grad_(False)


def _plain_linear(module: nn.Module) -> nn.Linear:
    assert isinstance(module, nn.Linear)
    plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
    plain.weight = nn.Parameter(module.weight.detach().clone(), requires_grad=False)
    if module.bias is not None:
        plain.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
    return plain


def apply_delta_(weight: torch.Tensor, delta: PreparedDelta, module: str, backbone: Backbone) -> None:
    """weight ← W ⊙ K + B·A + S of `module` (`TaskDelta.dense_weight`, the registered parts' dense effects),
    then pruned heads' input columns zeroed, in place. Needs the delta prepared with `keep_source=True`."""
    source = delta.source
    if source is None:
        raise ValueError(f"{delta.name}: the baselines need the parsed delta (prepare with keep_source=True)")
    dense = source.dense_weight(module, weight)
    for layer, head_keep in source.head_keep.items():
        if backbone.attention_output_modules[layer] == module:
            columns = head_keep.keep.to(device=weight.device, dtype=weight.dtype)
            dense = effective_weight(dense, input_keep=columns.repeat_interleave(backbone.head_dim))
    weight.copy_(dense)


def group_by_task(rows: Sequence[Task]) -> list[tuple[PreparedDelta, list[int]]]:
    """Row indices per task, tasks in order of first appearance."""
    groups: dict[int, tuple[PreparedDelta, list[int]]] = {}
    for index, (delta, _) in enumerate(rows):
        groups.setdefault(id(delta), (delta, []))[1].append(index)
    return list(groups.values())


class _PastaHooks:
    """PASTA on a plain model: before layer l, add vectors[l, slot] at each special token."""

    def __init__(self, backbone: Backbone, layers: Sequence[nn.Module]) -> None:
        self.backbone = backbone
        self.vectors: torch.Tensor | None = None
        self.slots: torch.Tensor | None = None
        Backbone.add_layer_input_hooks(layers, self._add)

    def set(self, delta: PreparedDelta | None, texts: Sequence[EncodedText] | None) -> None:
        if delta is None or delta.pasta is None or not texts:
            self.vectors = self.slots = None
            return
        self.vectors = delta.pasta.vectors
        self.slots = self.backbone.special_slots(texts)

    def _add(self, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        if self.vectors is None or self.slots is None:
            return None
        hit = (self.slots >= 0) & (self.slots < self.vectors.shape[1])
        rows, positions = hit.nonzero(as_tuple=True)
        hidden = hidden.clone()
        hidden[rows, positions] += self.vectors[layer, self.slots[rows, positions]]
        return hidden


def _heads(backbone: Backbone, delta: PreparedDelta, out) -> torch.Tensor:
    pooled = out.pooler_output if backbone.has_pooler else None
    return delta.head.classify_sequences(out.last_hidden_state, pooled)


class TaskCopies:
    """One full model per task with its effective weights; rows grouped and run per task."""

    def __init__(self, backbone: Backbone, pristine: nn.Module, deltas: Sequence[PreparedDelta]) -> None:
        self.backbone = backbone
        self.models: dict[int, tuple[nn.Module, _PastaHooks]] = {}
        for delta in deltas:
            if id(delta) in self.models:
                continue
            model = plain_copy(pristine)
            with torch.no_grad():
                for name in delta.modules:
                    apply_delta_(model.get_submodule(name).weight, delta, name, backbone)
            hooks = _PastaHooks(backbone, list(model.get_submodule(backbone.layout.layers)))
            self.models[id(delta)] = (model, hooks)

    @property
    def nbytes(self) -> int:
        return sum(sum(p.numel() * p.element_size() for p in m.parameters()) for m, _ in self.models.values())

    @torch.inference_mode()
    def forward(self, rows: Sequence[Task]) -> list[torch.Tensor]:
        outputs: list[torch.Tensor] = [torch.empty(0)] * len(rows)
        for delta, indices in group_by_task(rows):
            model, hooks = self.models[id(delta)]
            texts = [rows[i][1] for i in indices]
            kwargs = self.backbone.pad(texts)
            hooks.set(delta, texts)
            logits = _heads(self.backbone, delta, model(**kwargs))
            for i, row_logits in zip(indices, logits.unbind(0), strict=True):
                outputs[i] = row_logits.float().cpu()
        return outputs


class NaiveSwapper:
    """One shared model; per task: write its delta into the weights, run its rows, revert."""

    def __init__(self, backbone: Backbone, pristine: nn.Module) -> None:
        self.backbone = backbone
        self.model = plain_copy(pristine)
        self.originals = {name: self.model.get_submodule(name).weight.detach().clone()
                          for name in backbone.linear_modules}
        self.hooks = _PastaHooks(backbone, list(self.model.get_submodule(backbone.layout.layers)))

    @torch.inference_mode()
    def forward(self, rows: Sequence[Task]) -> list[torch.Tensor]:
        outputs: list[torch.Tensor] = [torch.empty(0)] * len(rows)
        for delta, indices in group_by_task(rows):
            weights = {name: self.model.get_submodule(name).weight for name in delta.modules}
            for name in delta.modules:
                apply_delta_(weights[name], delta, name, self.backbone)
            try:
                texts = [rows[i][1] for i in indices]
                kwargs = self.backbone.pad(texts)
                self.hooks.set(delta, texts)
                logits = _heads(self.backbone, delta, self.model(**kwargs))
            finally:
                self.hooks.set(None, None)
                for name, weight in weights.items():
                    weight.copy_(self.originals[name])
            for i, row_logits in zip(indices, logits.unbind(0), strict=True):
                outputs[i] = row_logits.float().cpu()
        return outputs


class PeftMixed:
    """PEFT's mixed-adapter batch over the same LoRA deltas (heads applied per task afterwards)."""

    def __init__(self, backbone: Backbone, pristine: nn.Module, deltas: Sequence[PreparedDelta]) -> None:
        import peft

        self.backbone = backbone
        self.names: dict[int, str] = {}
        model: nn.Module = plain_copy(pristine)
        for delta in deltas:
            if id(delta) in self.names:
                continue
            if delta.pasta is not None or any(p.keep is not None or p.sparse is not None or p.head_keep is not None
                                              for p in delta.modules.values()):
                raise ValueError(f"{delta.name}: PEFT's mixed batch only takes LoRA deltas")
            name = f"t{len(self.names)}"
            self.names[id(delta)] = name
            targets = sorted(delta.modules)
            ranks = {delta.modules[m].low_rank.A.shape[0] for m in targets}  # type: ignore[union-attr]
            if len(ranks) != 1:
                raise ValueError(f"{delta.name}: one LoRA rank for every module is needed here")
            rank = ranks.pop()
            config = peft.LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=targets)
            if isinstance(model, peft.PeftModel):
                model.add_adapter(name, config)
            else:
                model = peft.get_peft_model(model, config, adapter_name=name)
            base = model.get_base_model()
            with torch.no_grad():
                for module in targets:
                    low_rank = delta.modules[module].low_rank
                    layer = base.get_submodule(module)
                    layer.lora_A[name].weight.copy_(low_rank.A)  # type: ignore[union-attr]
                    layer.lora_B[name].weight.copy_(low_rank.B)  # type: ignore[union-attr]
        self.model = model.eval()

    @torch.inference_mode()
    def hidden(self, rows: Sequence[Task]):
        kwargs = self.backbone.pad([text for _, text in rows])
        return self.model(**kwargs, adapter_names=[self.names[id(delta)] for delta, _ in rows])

    @torch.inference_mode()
    def forward(self, rows: Sequence[Task]) -> list[torch.Tensor]:
        out = self.hidden(rows)
        outputs: list[torch.Tensor] = [torch.empty(0)] * len(rows)
        pooled_all = out.pooler_output if self.backbone.has_pooler else None
        for delta, indices in group_by_task(rows):
            index = torch.tensor(indices)
            pooled = pooled_all[index] if pooled_all is not None else None
            logits = delta.head.classify_sequences(out.last_hidden_state[index], pooled)
            for i, row_logits in zip(indices, logits.unbind(0), strict=True):
                outputs[i] = row_logits.float().cpu()
        return outputs


def max_difference(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """Largest absolute difference between two lists of per-row logits."""
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))
