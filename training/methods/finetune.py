"""Full fine-tuning: every weight of the backbone plus the head trains (the yardstick).

It produces no delta (a delta cannot change embeddings or LayerNorms), only a report.
"""

from __future__ import annotations

import argparse

from training.methods import Method, TaskInfo
from training.model import DeltaModel


class Finetune(Method):
    name = "finetune"
    exports = False
    default_lr = 1e-4

    def setup(self, model: DeltaModel, task: TaskInfo) -> None:
        model.encoder.requires_grad_(True)


def add_arguments(group: argparse._ArgumentGroup) -> None:
    """Full fine-tuning has no options of its own."""


def make(args: argparse.Namespace) -> Finetune:
    return Finetune()
