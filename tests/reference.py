"""The independent reference: a task's effective weights materialised in a private model copy.

Slow and obvious on purpose. For a task it deep-copies the untouched model, writes
W' = W ⊙ K + B·A + S into every linear weight and b' = b + δb into its bias, zeroes the input
columns of pruned heads in the attention output projection, adds PASTA vectors with a forward
pre-hook whose special-token slots are counted in plain Python, and runs each text alone (no
padding, batch of one). LayerNorm deltas are added to the copy's LayerNorm weights and biases;
the embedding shift is added by a pre-hook on the embeddings' LayerNorm, position by position.
Special tokens are those the tokenizer inserted (task-delta.md, amended): here, the tokens
whose `sequence_ids` entry is None, i.e. that belong to neither text. Mean pooling is the plain
mean over the lone text's positions (no padding to leave out), and an embedding's vector is
normalised by dividing by its norm, as the spec's words say.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from adapters_store.format import TaskDelta
from adapters_store.packing import unpack_bits
from server.backbone import LAYOUTS, EncodedText


class ReferenceTask:
    def __init__(self, pristine_model: torch.nn.Module, delta: TaskDelta) -> None:
        self.delta = delta
        self.model = copy.deepcopy(pristine_model).float().eval()
        layout = LAYOUTS[self.model.config.model_type]
        with torch.no_grad():
            for name in delta.modules():
                linear = self.model.get_submodule(name)
                weight = linear.weight.clone()
                if name in delta.keep:
                    weight = weight * unpack_bits(delta.keep[name].packed, tuple(weight.shape)).float()
                if name in delta.low_rank:
                    part = delta.low_rank[name]
                    weight = weight + part.B.float() @ part.A.float()
                if name in delta.sparse:
                    part = delta.sparse[name]
                    weight.view(-1)[part.index] += part.value.float()
                linear.weight.copy_(weight)
                if name in delta.bias:
                    delta_b = delta.bias[name].delta.float()
                    if linear.bias is None:
                        linear.bias = torch.nn.Parameter(delta_b.clone())
                    else:
                        linear.bias.add_(delta_b)
            num_heads = len(next(iter(delta.head_keep.values())).keep) if delta.head_keep else 1
            for layer, head_keep in delta.head_keep.items():
                out_proj = self.model.get_submodule(f"{layout.layers}.{layer}.{layout.attention_output}")
                head_dim = out_proj.in_features // num_heads
                for head, kept in enumerate(head_keep.keep.tolist()):
                    if not kept:
                        out_proj.weight[:, head * head_dim : (head + 1) * head_dim] = 0.0
            for name, norm in delta.norms.items():
                module = self.model.get_submodule(name)
                if norm.weight is not None:
                    module.weight += norm.weight.float()
                if norm.bias is not None:
                    module.bias += norm.bias.float()
        self._token_types: list[int] = []
        if delta.embedding_shift is not None:
            embedding_norm = next(module for name, module in self.model.named_modules()
                                  if name.startswith("embeddings.") and isinstance(module, torch.nn.LayerNorm))
            embedding_norm.register_forward_pre_hook(self._shift_hook(delta.embedding_shift))
        self._slots: list[int] = []
        if delta.pasta is not None:
            vectors = delta.pasta.vectors.float()
            for index, layer in enumerate(self.model.get_submodule(layout.layers)):
                layer.register_forward_pre_hook(self._pasta_hook(vectors[index]), with_kwargs=True)

    def _shift_hook(self, shift):
        def hook(module, args):
            summed = args[0].clone()
            for position, token_type in enumerate(self._token_types):
                if shift.position is not None and position < shift.position.shape[0]:
                    summed[0, position] += shift.position[position].float()
                if shift.token_type is not None:
                    summed[0, position] += shift.token_type[token_type].float()
            return (summed, *args[1:])

        return hook

    def _pasta_hook(self, layer_vectors: torch.Tensor):
        def hook(module, args, kwargs):
            key = "hidden_states" if "hidden_states" in kwargs else ("x" if "x" in kwargs else None)
            hidden = (args[0] if args else kwargs[key]).clone()
            for position, slot in enumerate(self._slots):
                if 0 <= slot < layer_vectors.shape[0]:
                    hidden[0, position] += layer_vectors[slot]
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, key: hidden}

        return hook

    @torch.no_grad()
    def logits(self, text: EncodedText) -> torch.Tensor:
        slots, count = [], 0
        for sequence in text.sequence_ids:
            if sequence is None:
                slots.append(count)
                count += 1
            else:
                slots.append(-1)
        self._slots = slots
        self._token_types = list(text.token_type_ids or [0] * len(text.input_ids))
        kwargs = {"input_ids": torch.tensor([text.input_ids])}
        if text.token_type_ids is not None:
            kwargs["token_type_ids"] = torch.tensor([text.token_type_ids])
        out = self.model(**kwargs)
        hidden = out.last_hidden_state[0]
        head = self.delta.head
        meta = self.delta.meta
        if meta.task_type == "token-classification":
            return F.linear(hidden, head.classifier_weight.float(), head.classifier_bias.float())
        # One text alone has no padding: every position counts in the mean, in float64 here.
        mean = hidden.double().mean(dim=0).float()
        if meta.task_type == "embedding":
            vector = mean if meta.pooling != "cls" else hidden[0]
            if head.projection_weight is not None:
                vector = vector @ head.projection_weight.float().T + head.projection_bias.float()
            if meta.normalize:
                vector = vector / vector.double().norm().float()
            return vector
        first = mean if meta.pooling == "mean" else hidden[0]
        if head.pooler_weight is not None:
            z = torch.tanh(F.linear(first, head.pooler_weight.float(), head.pooler_bias.float()))
        elif meta.pooling != "mean" and getattr(self.model, "pooler", None) is not None:
            z = out.pooler_output[0]
        else:
            z = first
        return F.linear(z, head.classifier_weight.float(), head.classifier_bias.float())
