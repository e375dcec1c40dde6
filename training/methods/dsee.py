"""DSEE (Chen et al. 2021): dually sparsity-embedded efficient tuning.

Phase 1 (dense): for query and value, a low-rank update B·A (rank 8; A random, B zero) plus a
sparse update S on a support Ω of the 16 largest |S| of a GreBsmo split of the pretrained
weight, both scaled alpha/r, trained over the run's annealed budget. Its kept epoch is restored,
then phase 2 prunes the pretrained weights and retrains (the paper's prune-then-retrain) for
`--dsee-retrain-epochs`, starting at a decayed rate (`--dsee-retrain-lr-scale` of the dense
peak, no warm-up: the model is already trained) and annealing to 0:
- unstructured: drop exactly `ratio` of the weights by magnitude of the trained weight
  |W + ΔW| (as the DSEE authors' code), ranked globally among the adapted modules and,
  separately at the same ratio, by |W| among the other encoder linears; exported as keep masks.
  (Ranking by |ΔW| alone, as before, removed 13-32 % of each adapted W's squared norm where
  magnitude removes 0.1-1.2 %.)
- structured: per layer, drop the `heads` heads with the smallest Σ|ΔW_q| + Σ|ΔW_v| over
  their rows; exported as head keeps.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

import torch
from torch import nn

from server.backbone import LAYER_ROLES
from training.grebsmo import sparse_support
from training.methods import Method, Phase, Recipe, TaskInfo
from training.methods.lora import add_low_rank
from training.model import DeltaLinear, DeltaModel
from training.parts import TrainableKeep, TrainableSparse


@dataclass
class DseeConfig:
    targets: tuple[str, ...] = ("query", "value")
    rank: int = 8
    alpha: float = 16.0
    sparse_k: int = 16
    grebsmo_rank: int = 8
    prune: str = "unstructured"  # unstructured | structured | none
    ratio: float = 0.2
    heads: int = 1
    retrain_epochs: int = 3
    retrain_lr_scale: float = 0.25  # the retrain's peak rate, as a share of the dense phase's


def delta_weight(module: DeltaLinear) -> torch.Tensor:
    """ΔW = (s·B)·A + S as a dense matrix (the one formula, on a zero weight)."""
    return module.delta_weight()


def trained_weight(module: DeltaLinear) -> torch.Tensor:
    """W + ΔW, the weight the dense phase trained (what magnitude pruning ranks)."""
    return module.weight.detach() + module.delta_weight()


def smallest_fraction(scores: dict[str, torch.Tensor], ratio: float) -> dict[str, torch.Tensor]:
    """Keep masks dropping exactly round(ratio·total) of the entries with the smallest scores."""
    names = list(scores)
    if not names:  # DSEE on every linear leaves no "others" group
        return {}
    flat = torch.cat([scores[name].reshape(-1) for name in names])
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    count = round(ratio * flat.numel())
    if count:
        keep[torch.topk(flat, count, largest=False).indices] = False
    masks, start = {}, 0
    for name in names:
        size = scores[name].numel()
        masks[name] = keep[start:start + size].view(scores[name].shape)
        start += size
    return masks


def heads_to_drop(delta_q: torch.Tensor, delta_v: torch.Tensor, num_heads: int, count: int) -> list[int]:
    head_dim = delta_q.shape[0] // num_heads
    scores = [float(delta_q[h * head_dim:(h + 1) * head_dim].abs().sum()
                    + delta_v[h * head_dim:(h + 1) * head_dim].abs().sum()) for h in range(num_heads)]
    return sorted(sorted(range(num_heads), key=lambda h: scores[h])[:count])


class Dsee(Method):
    name = "dsee"
    # 2e-3 as LoRA on q, v in run 2 (5e-4 and 1e-3 trailed fine-tuning by 3-5 points on SST-2).
    recipe = Recipe(lr=2e-3, head_lr=1e-3, epochs=5)

    def __init__(self, config: DseeConfig) -> None:
        self.config = config
        self.pruned: dict[str, object] = {}

    def adapted(self, model: DeltaModel) -> list[str]:
        return [model.layer_module(layer, role)
                for layer in range(model.backbone.num_layers) for role in self.config.targets]

    def setup(self, model: DeltaModel, task: TaskInfo) -> None:
        c = self.config
        for name in self.adapted(model):
            module = model.wrap(name)
            add_low_rank(module, c.rank, c.alpha)
            module.add_part(TrainableSparse(sparse_support(module.weight, c.sparse_k, c.grebsmo_rank),
                                            nn.Parameter(module.weight.new_zeros(c.sparse_k)), c.alpha / c.rank))

    def phases(self, epochs: int) -> list[Phase]:
        first = Phase("dense", epochs)
        if self.config.prune == "none" or self.config.retrain_epochs < 1:
            return [first]
        return [first, Phase("retrain", self.config.retrain_epochs, lr_scale=self.config.retrain_lr_scale,
                             warmup=False)]

    def before_phase(self, model: DeltaModel, index: int) -> None:
        if self.config.prune == "unstructured":
            self.prune_unstructured(model)
        else:
            self.prune_heads(model)

    def prune_unstructured(self, model: DeltaModel) -> None:
        adapted = self.adapted(model)
        others = [name for name in model.backbone.layer_modules(LAYER_ROLES) if name not in adapted]
        groups = [
            {name: trained_weight(model.deltas[name]).abs() for name in adapted},
            {name: model.wrap(name).weight.detach().abs() for name in others},
        ]
        dropped = 0
        for scores in groups:
            for name, keep in smallest_fraction(scores, self.config.ratio).items():
                model.deltas[name].add_part(TrainableKeep(keep=keep))
                dropped += int((~keep).sum())
        self.pruned = {"pruned_weights": dropped}

    def prune_heads(self, model: DeltaModel) -> None:
        num_heads = model.backbone.num_heads
        dropped = {}
        for layer in range(model.backbone.num_layers):
            delta_q = delta_weight(model.wrap(model.layer_module(layer, "query")))
            delta_v = delta_weight(model.wrap(model.layer_module(layer, "value")))
            heads = heads_to_drop(delta_q, delta_v, num_heads, self.config.heads)
            keep = torch.ones(num_heads, dtype=torch.uint8)
            keep[heads] = 0
            model.set_head_keep(layer, keep)
            dropped[layer] = heads
        self.pruned = {"dropped_heads": dropped}

    def describe(self) -> dict[str, object]:
        return {**asdict(self.config), **self.pruned}


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--dsee-targets", default=",".join(DseeConfig.targets),
                       help=f"layout roles given B·A + S, of {','.join(LAYER_ROLES)}")
    group.add_argument("--dsee-rank", type=int, default=DseeConfig.rank)
    group.add_argument("--dsee-alpha", type=float, default=DseeConfig.alpha)
    group.add_argument("--dsee-sparse-k", type=int, default=DseeConfig.sparse_k)
    group.add_argument("--dsee-prune", choices=("unstructured", "structured", "none"), default=DseeConfig.prune)
    group.add_argument("--dsee-ratio", type=float, default=DseeConfig.ratio, help="unstructured pruning ratio")
    group.add_argument("--dsee-heads", type=int, default=DseeConfig.heads, help="heads removed per layer")
    group.add_argument("--dsee-retrain-epochs", type=int, default=DseeConfig.retrain_epochs)
    group.add_argument("--dsee-retrain-lr-scale", type=float, default=DseeConfig.retrain_lr_scale,
                       help="the retrain's peak rate as a share of the dense phase's")


def make(args: argparse.Namespace) -> Dsee:
    return Dsee(DseeConfig(targets=tuple(args.dsee_targets.split(",")),
                           rank=args.dsee_rank, alpha=args.dsee_alpha, sparse_k=args.dsee_sparse_k,
                           prune=args.dsee_prune, ratio=args.dsee_ratio, heads=args.dsee_heads,
                           retrain_epochs=args.dsee_retrain_epochs,
                           retrain_lr_scale=args.dsee_retrain_lr_scale))
