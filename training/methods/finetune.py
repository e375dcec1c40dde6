"""Full fine-tuning: every weight of the backbone plus the head trains (the yardstick).

It produces no delta (a delta cannot change embeddings or LayerNorms), only a report.
"""

from __future__ import annotations

import argparse

from training.methods import Method, Recipe, TaskInfo
from training.model import DeltaModel


class Finetune(Method):
    name = "finetune"
    exports = False
    # 1e-4 for a 6-layer MiniLM (BERT-base recipes use 2e-5..5e-5; smaller models take more).
    recipe = Recipe(lr=1e-4, head_lr=1e-3, epochs=5)

    def setup(self, model: DeltaModel, task: TaskInfo) -> None:
        model.encoder.requires_grad_(True)
        if model.pooling == "mean" and model.backbone.has_pooler:
            model.encoder.get_submodule("pooler").requires_grad_(False)  # mean pooling never reads it


def add_arguments(group: argparse._ArgumentGroup) -> None:
    """Full fine-tuning has no options of its own."""


def make(args: argparse.Namespace) -> Finetune:
    return Finetune()
