"""LoRA (Hu et al. 2021): a trainable low-rank update `(alpha/r)·B·A` on chosen linears.

Defaults: every linear layer of every encoder layer (query, key, value, attention output and
both FFN projections: on q, v alone, the paper's GLUE setting, LoRA trailed fine-tuning by
2.4-4.6 points in RESULTS.md run 2), rank 8, alpha 16; A random (as PEFT's kaiming-uniform),
B zero so training starts at the pretrained function. The scale is folded into B on export.
Rate 1e-3 and rank 8 held in a sweep on SST-2 and CoNLL (RESULTS.md run 3): 5e-4 and 2e-3 moved the
two tasks in opposite directions, and rank 16 gained nothing beyond noise for twice the bytes.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass

from torch import nn

from server.backbone import LAYER_ROLES
from training.methods import Method, Recipe, TaskInfo
from training.model import DeltaLinear, DeltaModel
from training.parts import TrainableLowRank


@dataclass
class LoraConfig:
    targets: tuple[str, ...] = LAYER_ROLES
    rank: int = 8
    alpha: float = 16.0


def add_low_rank(module: DeltaLinear, rank: int, alpha: float) -> TrainableLowRank:
    A = nn.Parameter(module.weight.new_empty(rank, module.in_features))
    nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    B = nn.Parameter(module.weight.new_zeros(module.out_features, rank))
    return module.add_part(TrainableLowRank(A, B, alpha / rank))  # type: ignore[return-value]


class Lora(Method):
    name = "lora"
    # 1e-3 on every linear: at the q, v rate of 2e-3 the all-linear try diverged (RESULTS.md run 2).
    recipe = Recipe(lr=1e-3, head_lr=1e-3, epochs=8)

    def __init__(self, config: LoraConfig) -> None:
        self.config = config

    def setup(self, model: DeltaModel, task: TaskInfo) -> None:
        for layer in range(model.backbone.num_layers):
            for role in self.config.targets:
                add_low_rank(model.wrap(model.layer_module(layer, role)), self.config.rank, self.config.alpha)

    def describe(self) -> dict[str, object]:
        return asdict(self.config)


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--lora-rank", type=int, default=LoraConfig.rank)
    group.add_argument("--lora-alpha", type=float, default=LoraConfig.alpha)
    group.add_argument("--lora-targets", default=",".join(LoraConfig.targets),
                       help=f"layout roles, of {','.join(LAYER_ROLES)}")


def make(args: argparse.Namespace) -> Lora:
    return Lora(LoraConfig(tuple(args.lora_targets.split(",")), args.lora_rank, args.lora_alpha))
