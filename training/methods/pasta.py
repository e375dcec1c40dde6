"""PASTA (Yang et al. 2022): one trainable vector per layer per special-token slot.

Before each layer, `vectors[l, p]` is added to the hidden state of the p-th special token the
tokenizer inserted (2 slots for single texts: [CLS], [SEP]; 3 for pairs; see
`Backbone.special_slots`). Only the vectors and the classifier train. Vectors start at zero, so
training starts from the pretrained function.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

from training.methods import Method, Recipe, TaskInfo
from training.model import DeltaModel


@dataclass
class PastaConfig:
    slots: int | None = None  # None: 2 for single texts, 3 for pairs


class Pasta(Method):
    name = "pasta"
    # The paper trains 50-150 epochs at 5e-4..7e-3; with a CPU budget, a higher rate and a larger
    # budget than the other methods get there in fewer steps (at 1e-2, 12 epochs were still climbing
    # on CoNLL in RESULTS.md run 2). A trained task pooler did not help on [CLS] (84.6, 85.5, 84.5
    # validation over the first three SST-2 epochs, against 84.3, 86.3, 86.9 without).
    recipe = Recipe(lr=1e-2, head_lr=1e-3, epochs=10)

    def __init__(self, config: PastaConfig) -> None:
        self.config = config
        self.slots = 0

    def setup(self, model: DeltaModel, task: TaskInfo) -> None:
        self.slots = self.config.slots or (3 if task.pairs else 2)
        model.init_pasta(self.slots)

    def describe(self) -> dict[str, object]:
        return {**asdict(self.config), "slots": self.slots}


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--pasta-slots", type=int, default=None, help="default: 2 single texts, 3 pairs")


def make(args: argparse.Namespace) -> Pasta:
    return Pasta(PastaConfig(args.pasta_slots))
