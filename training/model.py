"""The spec's forward pass as trainable torch modules.

`DeltaModel` wraps a `Backbone`'s base model in place: every `nn.Linear` a method touches
becomes a `DeltaLinear` computing `W ⊙ K + B·A + S` from its trainable parts (`training.parts`,
one class per part kind; head keep zeroes input columns of the attention output projection),
PASTA vectors are added by forward pre-hooks on the layers, and the task head follows
task-delta.md. Training therefore optimises exactly the function the engine serves, and
`export()` / `load_delta()` convert to and from a `TaskDelta`.

The dense formula itself is `adapters_store.formula.effective_weight` (one home, autograd-safe);
swapping linears in place, the layer-input hooks, layer roles, PASTA slots and the head's pooler
choice are `Backbone` methods shared with the baselines. Everything is created on the
backbone's device, so the same code trains on a GPU.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from adapters_store.format import MODULE_PARTS, DeltaMeta, HeadKeep, ModulePart, PastaVectors, TaskDelta, TaskHead
from adapters_store.formula import effective_weight
from server.backbone import Backbone
from server.pooling import POOLING_MODES, head_input, l2_normalize, pool
from training.parts import TRAINABLE_PARTS, BinaryStep, TrainableKeep, TrainablePart

__all__ = ["BinaryStep", "DeltaLinear", "DeltaModel", "model_from_delta"]


class DeltaLinear(nn.Module):
    """An `nn.Linear` whose effective weight is its trainable parts composed: `W ⊙ K + (s·B)·A + scatter(Ω, s·S)`.

    One trainable part per registered kind (`training.parts`), applied in the format registry's
    order, so the served weight is bit-for-bit the trained one; head keep (`input_keep`) zeroes
    input columns last.
    """

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.parts = nn.ModuleDict()
        self.input_keep: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def add_part(self, part: TrainablePart) -> TrainablePart:
        """Install (or replace) this module's part of `part.kind`."""
        self.parts[part.kind] = part
        return part

    def part(self, kind: str) -> TrainablePart | None:
        return self.parts[kind] if kind in self.parts else None  # noqa: SIM401 (ModuleDict: no .get)

    def ordered_parts(self) -> list[TrainablePart]:
        return [self.parts[kind] for kind in MODULE_PARTS if kind in self.parts]  # type: ignore[misc]

    def keep_mask(self) -> torch.Tensor | None:
        """The binary `K` (bool), learned or fixed; None when the module is not masked."""
        keep = self.part(TrainableKeep.kind)
        return keep.mask() if isinstance(keep, TrainableKeep) else None

    def effective_weight(self) -> torch.Tensor:
        weight = self.weight
        for part in self.ordered_parts():
            weight = part.apply_to(weight)
        if self.input_keep is not None:
            weight = effective_weight(weight, input_keep=self.input_keep)
        return weight

    def effective_bias(self) -> torch.Tensor | None:
        bias = self.bias
        for part in self.ordered_parts():
            bias = part.apply_to_bias(bias)
        return bias

    def delta_weight(self) -> torch.Tensor:
        """ΔW = (s·B)·A + S alone (the additive parts on a zero W), detached; what DSEE prunes by."""
        with torch.no_grad():
            delta = torch.zeros(self.shape, dtype=self.weight.dtype, device=self.weight.device)
            for part in self.ordered_parts():
                if part.additive:
                    delta = part.apply_to(delta)
            return delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.effective_bias())


class DeltaModel(nn.Module):
    """Backbone + one task's delta parts + task head, computing task-delta.md's forward."""

    def __init__(
        self,
        backbone: Backbone,
        task_type: str,
        num_labels: int,
        *,
        head_pooler: bool = False,
        word_piece: str = "first",
        pooling: str | None = None,
    ) -> None:
        super().__init__()
        pooling = pooling or ("mean" if task_type == "embedding" else "cls")
        if pooling not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {POOLING_MODES}, not {pooling!r}")
        if pooling == "mean" and task_type == "token-classification":
            raise ValueError("mean pooling is for sequence classification and embeddings (a token task reads "
                             "every token)")
        # Training needs float32 master weights: AdamW's updates (and its eps) vanish in float16.
        if any(p.dtype != torch.float32 for p in backbone.model.parameters()):
            raise ValueError("training needs a float32 backbone (load it with dtype=torch.float32; autocast "
                             "gives the speed of half precision)")
        self.backbone = backbone
        self.encoder = backbone.model
        # where the weights are (the backbone's device): everything the model creates goes there
        self.device = next(backbone.model.parameters()).device
        self.task_type = task_type
        self.word_piece = word_piece
        self.pooling = pooling
        d = backbone.hidden_size
        # An embedding task has no classifier: its answer is the pooled vector (task-delta.md, Head),
        # mean pooled and L2-normalised, through a linear `projection` when it has one.
        self.classifier: DeltaLinear | None = None
        if task_type != "embedding":
            classifier = nn.Linear(d, num_labels)
            nn.init.normal_(classifier.weight, std=0.02)
            nn.init.zeros_(classifier.bias)
            self.classifier = DeltaLinear(classifier.to(self.device))
        self.normalize = True
        self.projection: nn.Linear | None = None
        self.pooler: nn.Linear | None = None
        if head_pooler:
            if task_type != "sequence-classification":
                raise ValueError("a task pooler is only for sequence classification")
            self.pooler = nn.Linear(d, d, device=self.device)
            if backbone.has_pooler and pooling == "cls":  # start from the pretrained pooler: it reads [CLS]
                with torch.no_grad():
                    self.pooler.load_state_dict(self.encoder.get_submodule("pooler.dense").state_dict())
        self.deltas: dict[str, DeltaLinear] = {}
        self.pasta: nn.Parameter | None = None
        self.head_keep: dict[int, torch.Tensor] = {}
        self._slots: torch.Tensor | None = None
        Backbone.add_layer_input_hooks(backbone.layers, self._add_pasta)

    # ------------------------------------------------------------------ structure

    def wrap(self, name: str) -> DeltaLinear:
        """Replace the backbone linear `name` by a `DeltaLinear` (once) and return it."""
        if name in self.deltas:
            return self.deltas[name]
        if name not in self.backbone.linear_modules:
            raise KeyError(f"the backbone has no linear module {name!r}")
        wrapped = Backbone.replace_module(self.encoder, name, DeltaLinear)
        assert isinstance(wrapped, DeltaLinear)
        self.deltas[name] = wrapped
        return wrapped

    def layer_module(self, layer: int, role: str) -> str:
        """Full name of a layer's module by layout role (`query`, `ffn_in`, `attention_output`...)."""
        return self.backbone.layer_module(layer, role)

    def set_head_keep(self, layer: int, keep: torch.Tensor) -> None:
        keep = keep.to(torch.uint8).cpu()
        self.head_keep[layer] = keep
        columns = keep.repeat_interleave(self.backbone.head_dim).to(device=self.device, dtype=torch.float32)
        self.wrap(self.layer_module(layer, "attention_output")).input_keep = columns

    def init_pasta(self, slots: int) -> nn.Parameter:
        self.pasta = nn.Parameter(torch.zeros(self.backbone.num_layers, slots, self.backbone.hidden_size,
                                              device=self.device))
        return self.pasta

    def _add_pasta(self, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        """vectors[layer, p] added at the p-th special token of each row (task-delta.md)."""
        if self.pasta is None or self._slots is None:
            return None
        onehot = (self._slots.unsqueeze(-1) == torch.arange(self.pasta.shape[1], device=hidden.device))
        return hidden + onehot.to(hidden.dtype) @ self.pasta[layer].to(hidden.dtype)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        special_tokens_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits: [N, C] for sequence classification, [N, L, C] for token classification; for an
        embedding task the [N, D] vectors as served.

        `special_tokens_mask` ([N, L], the tokenizer's) is needed when the model has PASTA vectors.
        """
        if self.pasta is not None:
            if special_tokens_mask is None:
                raise ValueError("PASTA needs the tokenizer's special_tokens_mask to find its slots")
            self._slots = self.backbone.slots_from_mask(special_tokens_mask)
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None and self.backbone.uses_token_types:
            kwargs["token_type_ids"] = token_type_ids
        try:
            out = self.encoder(**kwargs)
        finally:
            self._slots = None
        hidden = out.last_hidden_state
        if self.task_type == "embedding":
            vectors = pool(hidden, attention_mask, self.pooling)
            if self.projection is not None:
                vectors = self.projection(vectors)
            return l2_normalize(vectors) if self.normalize else vectors
        assert self.classifier is not None
        if self.task_type == "token-classification":
            return self.classifier(hidden)
        pooled = out.pooler_output if self.backbone.has_pooler and self.pooling == "cls" else None
        return self.classifier(head_input(hidden, attention_mask, self.pooling, self.pooler, pooled))

    def features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """What the classifier reads for `batch` ([N, d] or [N, L, d]), without gradients."""
        captured: list[torch.Tensor] = []
        handle = self.classifier.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
        try:
            with torch.no_grad():
                self.run(batch)
        finally:
            handle.remove()
        return captured[0]

    def run(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """`forward` on a collated batch (moved to the model's device; labels ignored)."""
        return self(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device),
                    batch["token_type_ids"].to(self.device) if "token_type_ids" in batch else None,
                    batch["special_tokens_mask"].to(self.device) if "special_tokens_mask" in batch else None)

    # ------------------------------------------------------------------ delta file

    def export(self, meta: DeltaMeta) -> TaskDelta:
        """The trained parts as a `TaskDelta`, scales folded in."""
        parts: list[ModulePart] = []
        with torch.no_grad():
            for name, module in sorted(self.deltas.items()):
                parts += [part.export(name, module.shape) for part in module.ordered_parts()]
            head = TaskHead(
                self.classifier.effective_weight().detach().cpu().clone() if self.classifier is not None else None,
                self.classifier.bias.detach().cpu().clone() if self.classifier is not None else None,
                self.pooler.weight.detach().cpu().clone() if self.pooler is not None else None,
                self.pooler.bias.detach().cpu().clone() if self.pooler is not None else None,
                self.projection.weight.detach().cpu().clone() if self.projection is not None else None,
                self.projection.bias.detach().cpu().clone() if self.projection is not None else None,
            )
            head_keep = {layer: HeadKeep(layer, keep_.clone()) for layer, keep_ in sorted(self.head_keep.items())}
            pasta = PastaVectors(self.pasta.detach().cpu().clone()) if self.pasta is not None else None
        return TaskDelta.from_parts(meta, head, parts, head_keep, pasta)

    def load_delta(self, delta: TaskDelta) -> None:
        """Install a parsed delta's parts (frozen) so this model computes what it specifies."""
        if delta.norms or delta.embedding_shift is not None:
            raise ValueError("this delta has LayerNorm deltas or an embedding shift (an imported fine-tune); "
                             "training cannot start from those parts")
        dev = self.device
        with torch.no_grad():
            for name, found in delta.module_parts.items():
                module = self.wrap(name)
                for kind, part in found.items():
                    module.add_part(TRAINABLE_PARTS[kind].frozen(part, dev))
            for layer, part in delta.head_keep.items():
                self.set_head_keep(layer, part.keep)
            if delta.pasta is not None:
                self.pasta = nn.Parameter(delta.pasta.vectors.float().to(dev).clone(), requires_grad=False)
            head = delta.head
            d = self.backbone.hidden_size
            if head.classifier_weight is not None and head.classifier_bias is not None:
                self.classifier = DeltaLinear(nn.Linear(d, head.classifier_weight.shape[0], device=dev))
                self.classifier.weight.copy_(head.classifier_weight.float())
                self.classifier.bias.copy_(head.classifier_bias.float())
            if head.projection_weight is not None and head.projection_bias is not None:
                self.projection = nn.Linear(d, head.projection_weight.shape[0], device=dev)
                self.projection.weight.copy_(head.projection_weight.float())
                self.projection.bias.copy_(head.projection_bias.float())
            if head.pooler_weight is not None and head.pooler_bias is not None:
                self.pooler = nn.Linear(d, d, device=dev)
                self.pooler.weight.copy_(head.pooler_weight.float())
                self.pooler.bias.copy_(head.pooler_bias.float())
        self.word_piece = delta.meta.word_piece
        self.pooling = delta_pooling(delta.meta)
        if delta.meta.is_embedding:
            self.normalize = delta.meta.normalize
        self.requires_grad_(False)


def delta_pooling(meta: DeltaMeta) -> str:
    """A delta's `pooling` for the trainer's model: `cls` for token classification (every token is read)."""
    return meta.pooling if meta.task_type != "token-classification" and meta.pooling else "cls"


def model_from_delta(backbone: Backbone, delta: TaskDelta) -> DeltaModel:
    """A frozen `DeltaModel` computing exactly what `delta` specifies on `backbone`."""
    model = DeltaModel(backbone, delta.meta.task_type, len(delta.meta.labels), word_piece=delta.meta.word_piece,
                       pooling=delta_pooling(delta.meta))
    model.load_delta(delta)
    return model.eval()
