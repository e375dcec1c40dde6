"""The backbone's model-surgery room: where each family keeps its modules, and the glue that edits them.

`Layout` names a family's layers and linears; `Surgery` (part of `Backbone`) turns roles into
module names, swaps a submodule in place (how a backend installs its linear modules), and hooks
every layer's input (PASTA in the engine, the trainer and the baselines). One place for each.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Layout:
    """Where a family keeps its transformer layers and attention output projection."""

    layers: str  # path of the ModuleList of layers inside the base model
    attention_output: str  # the attention output projection, relative to a layer
    query: str
    key: str
    value: str
    ffn_in: str
    ffn_out: str


LAYOUTS: dict[str, Layout] = {
    "bert": Layout("encoder.layer", "attention.output.dense", "attention.self.query", "attention.self.key",
                   "attention.self.value", "intermediate.dense", "output.dense"),
    "distilbert": Layout("transformer.layer", "attention.out_lin", "attention.q_lin", "attention.k_lin",
                         "attention.v_lin", "ffn.lin1", "ffn.lin2"),
    "mpnet": Layout("encoder.layer", "attention.attn.o", "attention.attn.q", "attention.attn.k",
                    "attention.attn.v", "intermediate.dense", "output.dense"),
}
LAYOUTS["roberta"] = LAYOUTS["xlm-roberta"] = LAYOUTS["camembert"] = LAYOUTS["bert"]


# Layout roles of the linears inside one transformer layer (attribute names of `Layout`).
LAYER_ROLES = ("query", "key", "value", "attention_output", "ffn_in", "ffn_out")



class Surgery:
    """Model-editing glue of `Backbone` (reads its layout and layer count)."""

    layout: Layout
    num_layers: int

    def layer_module(self, layer: int, role: str) -> str:
        """Full name of layer `layer`'s linear with layout role `role` (`query`, `ffn_in`, ...)."""
        if role not in LAYER_ROLES:
            raise KeyError(f"unknown layer role {role!r}; roles are {LAYER_ROLES}")
        return f"{self.layout.layers}.{layer}.{getattr(self.layout, role)}"

    def layer_modules(self, roles: Sequence[str] = LAYER_ROLES, first_layer: int = 0) -> list[str]:
        """Names of the given roles' linears in layers first_layer..L-1, layer by layer."""
        return [self.layer_module(layer, role) for layer in range(first_layer, self.num_layers) for role in roles]

    @staticmethod
    def replace_module(model: nn.Module, name: str, make: Callable[[nn.Module], nn.Module]) -> nn.Module:
        """Swap submodule `name` of `model` in place for `make(old)`; returns the new module."""
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        new = make(getattr(parent, child))
        setattr(parent, child, new)
        return new

    @staticmethod
    def add_layer_input_hooks(layers: Sequence[nn.Module],
                              add: Callable[[int, torch.Tensor], torch.Tensor | None]) -> list:
        """Before layer l runs, its hidden-state input h becomes `add(l, h)` (None: unchanged).

        Families pass the hidden states positionally or as `hidden_states` / `x` (DistilBERT);
        this is where that is handled once (PASTA in the engine, the trainer and the baselines).
        """
        handles = []
        for index, layer in enumerate(layers):
            def hook(module: nn.Module, args: tuple, kwargs: dict, index: int = index):
                if args:
                    new = add(index, args[0])
                    return None if new is None else ((new, *args[1:]), kwargs)
                for key in ("hidden_states", "x"):
                    if key in kwargs:
                        new = add(index, kwargs[key])
                        return None if new is None else (args, {**kwargs, key: new})
                raise RuntimeError(f"layer {index}: cannot find the hidden states among the layer's inputs")

            handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
        return handles
