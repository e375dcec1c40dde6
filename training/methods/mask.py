"""Masking (Zhao et al. 2020): learn a binary keep mask over pretrained weights.

Each chosen linear gets a real-valued score per weight; the mask is `score >= tau` and the
gradient passes straight through to the scores. Scores start uniform on [0, score_scale)
with `tau` placed so that `initial_sparsity` of the weights starts masked. Defaults follow
the paper: query, key, value, attention output, intermediate and output of layers 2..L-1,
plus the pooler; never embeddings, LayerNorms or biases. The classifier trains normally
unless `--mask-classifier` (the paper's variant: a random classifier that is only masked,
exported as its masked weight because a delta's head is stored as floats).
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

import torch
from torch import nn

from server.backbone import LAYER_ROLES
from training.methods import Method, Recipe, TaskInfo
from training.model import DeltaLinear, DeltaModel
from training.parts import TrainableKeep


@dataclass
class MaskConfig:
    first_layer: int = 2
    roles: tuple[str, ...] = LAYER_ROLES
    pooler: bool = True
    initial_sparsity: float = 0.05
    score_scale: float = 0.02
    mask_classifier: bool = False


def add_scores(module: DeltaLinear, config: MaskConfig, generator: torch.Generator | None = None) -> None:
    scores = torch.rand(module.shape, generator=generator) * config.score_scale  # CPU draw: same on any device
    scores = nn.Parameter(scores.to(device=module.weight.device, dtype=module.weight.dtype))
    module.add_part(TrainableKeep(scores=scores, tau=config.initial_sparsity * config.score_scale))


class Mask(Method):
    name = "mask"
    # Scores live on [0, 0.02) around tau = 0.001: Adam at 1e-4 moves a score across tau in ~10
    # steps, and the classifier (random) learns at 1e-3.
    recipe = Recipe(lr=1e-4, head_lr=1e-3, epochs=6)

    def __init__(self, config: MaskConfig) -> None:
        self.config = config

    def modules(self, model: DeltaModel) -> list[str]:
        names = model.backbone.layer_modules(self.config.roles, self.config.first_layer)
        # the backbone's pooler is read only with `cls` pooling of a classification (task-delta.md):
        # a mask there would be dead bytes otherwise
        if (self.config.pooler and model.pooling == "cls" and model.task_type != "embedding"
                and "pooler.dense" in model.backbone.linear_modules):
            names.append("pooler.dense")
        return names

    def setup(self, model: DeltaModel, task: TaskInfo) -> None:
        for name in self.modules(model):
            add_scores(model.wrap(name), self.config)
        if self.config.mask_classifier:
            if model.classifier is None:
                raise ValueError("--mask-classifier: an embedding task has no classifier to mask")
            model.classifier.weight.requires_grad_(False)
            model.classifier.bias.requires_grad_(False)
            add_scores(model.classifier, self.config)

    def describe(self) -> dict[str, object]:
        return asdict(self.config)


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--mask-first-layer", type=int, default=MaskConfig.first_layer)
    group.add_argument("--mask-initial-sparsity", type=float, default=MaskConfig.initial_sparsity)
    group.add_argument("--mask-score-scale", type=float, default=MaskConfig.score_scale)
    group.add_argument("--mask-no-pooler", action="store_true", help="leave the pooler unmasked")
    group.add_argument("--mask-classifier", action="store_true",
                       help="paper variant: random classifier, only masked")


def make(args: argparse.Namespace) -> Mask:
    return Mask(MaskConfig(first_layer=args.mask_first_layer, pooler=not args.mask_no_pooler,
                           initial_sparsity=args.mask_initial_sparsity, score_scale=args.mask_score_scale,
                           mask_classifier=args.mask_classifier))
