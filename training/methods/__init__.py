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
    """A method's default budget and rates (each overridable on the command line).

    The budget is annealed: the learning rate warms up, then decays linearly to 0 at the end of
    `epochs`, and the kept epoch is the best on validation among the annealed part (epochs from
    `select_from` of the budget on). Training stops early only when validation falls further
    below its best than its noise (`stop_drop` standard errors).
    """

    lr: float  # the method's own parameters (scores, vectors, low-rank factors, or every weight)
    head_lr: float | None = None  # the readout (classifier, task pooler), its own group; None: same as lr
    epochs: int = 6  # the budget: the rate reaches 0 at its end
    warmup_ratio: float = 0.06  # linear warm-up over this share of the budget's steps (at most one epoch)
    select_from: float = 0.5  # epochs in the last (1 - select_from) of the budget compete to be kept
    stop_drop: float = 2.0  # early stop when validation drops this many standard errors under its best
    head_fit: bool = False  # fit the classifier on frozen features before training


@dataclass(frozen=True)
class Phase:
    """A stretch of training with its own optimiser and annealed schedule; only the last one exports."""

    name: str
    epochs: int  # the phase's budget: its schedule reaches 0 at its end
    lr_scale: float = 1.0  # peak rates are the recipe's times this
    warmup: bool = True  # False: start at the peak (a phase continuing an already trained model)


class Method:
    name = ""
    exports = True  # False: nothing to write as a delta (full fine-tuning)
    recipe = Recipe(lr=1e-3)

    def setup(self, model: DeltaModel, task: TaskInfo) -> None:
        raise NotImplementedError

    def phases(self, epochs: int) -> list[Phase]:
        """The phases of a run whose (first) phase has a budget of `epochs`."""
        return [Phase("train", epochs)]

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
