"""Training methods, one module each (PEFT-like): a config dataclass of the method's flags with
the paper's defaults, and a `Method` that decides what in a `DeltaModel` trains.

`Method` is the small protocol the trainer drives: `setup` before training, `total_epochs`,
and `on_epoch_end` for methods with phases (DSEE prunes, then retrains).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from types import ModuleType

from training.model import DeltaModel


@dataclass
class TaskInfo:
    """What a method may need to know of the task before training."""

    task_type: str
    num_labels: int
    pairs: bool


class Method:
    name = ""
    exports = True  # False: nothing to write as a delta (full fine-tuning)
    default_lr = 1e-3
    default_head_lr: float | None = None  # None: same as lr

    def setup(self, model: DeltaModel, task: TaskInfo) -> None:
        raise NotImplementedError

    def total_epochs(self, epochs: int) -> int:
        return epochs

    def on_epoch_end(self, model: DeltaModel, epoch: int) -> bool:
        """Called after each epoch (1-based); True when the model changed so earlier epochs no longer count."""
        return False

    def describe(self) -> dict[str, object]:
        return {}


def registry() -> dict[str, ModuleType]:
    from training.methods import dsee, finetune, lora, mask, pasta

    return {"mask": mask, "pasta": pasta, "dsee": dsee, "lora": lora, "finetune": finetune}


def add_all_arguments(parser: argparse.ArgumentParser) -> None:
    for module in registry().values():
        module.add_arguments(parser.add_argument_group(f"{module.__name__.rsplit('.', 1)[-1]} options"))


def make_method(name: str, args: argparse.Namespace) -> Method:
    module = registry()[name]
    return module.make(args)
