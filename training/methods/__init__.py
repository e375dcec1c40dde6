"""Training methods, one module each (PEFT-like): a config dataclass of the method's flags with
the paper's defaults, and a `Method` that decides what in a `DeltaModel` trains.

`Method` is the small protocol the trainer drives: `setup` before training, its `recipe` (the
learning rates and budget that work without tuning, see RESULTS.md for how they were settled),
and `phases` / `before_phase` for methods that change the model between phases (DSEE prunes,
then retrains).
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


@dataclass(frozen=True)
class Recipe:
    """A method's default training budget and rates (each overridable on the command line)."""

    lr: float  # the method's own parameters (scores, vectors, low-rank factors, or every weight)
    head_lr: float | None = None  # the task head (starts random); None: same as lr
    max_epochs: int = 8  # cap when early stopping decides the budget
    patience: int = 1  # epochs without a better validation score before stopping
    warmup_ratio: float = 0.06  # linear warm-up over this share of the (capped) steps, then linear decay


@dataclass(frozen=True)
class Phase:
    """A stretch of training with its own optimiser and schedule; only the last one exports."""

    name: str
    epochs: int  # fixed epochs, or the cap under early stopping
    fixed: bool  # True: run exactly `epochs` (no early stop)
    patience: int


class Method:
    name = ""
    exports = True  # False: nothing to write as a delta (full fine-tuning)
    recipe = Recipe(lr=1e-3)

    def setup(self, model: DeltaModel, task: TaskInfo) -> None:
        raise NotImplementedError

    def phases(self, epochs: int | None, max_epochs: int, patience: int) -> list[Phase]:
        """`epochs` given: a fixed budget; else early stopping under `max_epochs`."""
        if epochs is not None:
            return [Phase("train", epochs, True, patience)]
        return [Phase("train", max_epochs, False, patience)]

    def before_phase(self, model: DeltaModel, index: int) -> None:
        """Called before phase `index` > 0, on the best model of the phase before."""

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
