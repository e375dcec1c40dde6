"""Trainable forms of the format's module parts: one class per registered kind.

Each class mirrors a format class of `adapters_store.format` registered under the same kind
(`MODULE_PARTS`): it holds that part's trainable tensors, applies its term of
`W ⊙ K + B·A + S` to a weight (autograd-safe, through `adapters_store.formula.effective_weight`),
exports itself to the format class with any training-time scale folded in, and loads frozen from
one. `training.model.DeltaLinear` composes whatever parts a module has in the registry's order,
so a new kind is one class here, beside its format class and its prepared classes.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from adapters_store.format import BiasDelta, KeepMask, LowRank, ModulePart, SparseUpdate
from adapters_store.formula import effective_weight
from adapters_store.packing import pack_bits, unpack_bits


class BinaryStep(torch.autograd.Function):
    """`scores >= tau` forward, identity backward (straight-through estimator)."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, tau: float) -> torch.Tensor:  # type: ignore[override]
        return (scores >= tau).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None


class TrainablePart(nn.Module):
    """One module part while training. `additive` parts add to the weight (they make up ΔW)."""

    kind: ClassVar[str]
    additive: ClassVar[bool] = True

    def apply_to(self, weight: torch.Tensor) -> torch.Tensor:
        """This part's term of the formula applied to `weight` (parts compose in registry order)."""
        raise NotImplementedError

    def apply_to_bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        """This part's term applied to the module's bias; most parts leave it alone."""
        return bias

    def export(self, module: str, shape: tuple[int, int]) -> ModulePart:
        """The format part, scales folded in, detached on the CPU."""
        raise NotImplementedError

    @classmethod
    def frozen(cls, part: ModulePart, device: torch.device) -> TrainablePart:
        """Computes exactly what `part` specifies; nothing trainable."""
        raise NotImplementedError


TRAINABLE_PARTS: dict[str, type[TrainablePart]] = {}
"""kind -> trainable class, the same kinds as `adapters_store.format.MODULE_PARTS`."""


def register_trainable(cls: type[TrainablePart]) -> type[TrainablePart]:
    if cls.kind in TRAINABLE_PARTS:
        raise ValueError(f"trainable part kind {cls.kind!r} is registered twice")
    TRAINABLE_PARTS[cls.kind] = cls
    return cls


@register_trainable
class TrainableKeep(TrainablePart):
    """`K`: a fixed boolean mask, or learned as `scores >= tau` (straight-through)."""

    kind = KeepMask.kind
    additive = False

    def __init__(self, keep: torch.Tensor | None = None, scores: nn.Parameter | None = None, tau: float = 0.0) -> None:
        super().__init__()
        if (keep is None) == (scores is None):
            raise ValueError("a keep part is either a fixed mask or learned scores")
        self.keep = keep
        self.scores = scores
        self.tau = tau

    def mask(self) -> torch.Tensor:
        """The binary `K` (bool), detached."""
        if self.scores is not None:
            return (self.scores >= self.tau).detach()
        assert self.keep is not None
        return self.keep

    def apply_to(self, weight: torch.Tensor) -> torch.Tensor:
        keep = BinaryStep.apply(self.scores, self.tau) if self.scores is not None else self.keep
        return effective_weight(weight, keep=keep)

    def export(self, module: str, shape: tuple[int, int]) -> KeepMask:
        return KeepMask(module, shape, pack_bits(self.mask().cpu()))

    @classmethod
    def frozen(cls, part: ModulePart, device: torch.device) -> TrainableKeep:
        assert isinstance(part, KeepMask)
        return cls(keep=unpack_bits(part.packed, part.shape).to(device))


@register_trainable
class TrainableLowRank(TrainablePart):
    """`(s·B)·A`: the scale is kept apart while training and folded into B on export."""

    kind = LowRank.kind

    def __init__(self, A: nn.Parameter, B: nn.Parameter, scale: float = 1.0) -> None:
        super().__init__()
        self.A = A  # [r, in]
        self.B = B  # [out, r]
        self.scale = scale

    def folded_B(self) -> torch.Tensor:
        return self.B * self.scale

    def apply_to(self, weight: torch.Tensor) -> torch.Tensor:
        return effective_weight(weight, lora_A=self.A, lora_B=self.folded_B())

    def export(self, module: str, shape: tuple[int, int]) -> LowRank:
        return LowRank(module, self.A.detach().cpu().clone(), self.folded_B().detach().cpu().clone())

    @classmethod
    def frozen(cls, part: ModulePart, device: torch.device) -> TrainableLowRank:
        assert isinstance(part, LowRank)
        return cls(nn.Parameter(part.A.float().to(device).clone(), requires_grad=False),
                   nn.Parameter(part.B.float().to(device).clone(), requires_grad=False))


@register_trainable
class TrainableSparse(TrainablePart):
    """`scatter(Ω, s·S)` on a fixed support Ω; the scale is folded into the values on export."""

    kind = SparseUpdate.kind

    def __init__(self, index: torch.Tensor, value: nn.Parameter, scale: float = 1.0) -> None:
        super().__init__()
        self.index = index  # int64 [k], flat row-major
        self.value = value  # [k]
        self.scale = scale

    def folded_value(self) -> torch.Tensor:
        return self.value * self.scale

    def apply_to(self, weight: torch.Tensor) -> torch.Tensor:
        return effective_weight(weight, sparse_index=self.index, sparse_value=self.folded_value())

    def export(self, module: str, shape: tuple[int, int]) -> SparseUpdate:
        return SparseUpdate(module, shape, self.index.cpu().clone(), self.folded_value().detach().cpu().clone())

    @classmethod
    def frozen(cls, part: ModulePart, device: torch.device) -> TrainableSparse:
        assert isinstance(part, SparseUpdate)
        return cls(part.index.to(device).clone(),
                   nn.Parameter(part.value.float().to(device).clone(), requires_grad=False))


@register_trainable
class TrainableBias(TrainablePart):
    """`b + δb`. Nothing trains it today (import writes it); frozen, it serves a loaded delta exactly."""

    kind = BiasDelta.kind
    additive = False  # it changes the bias, not W

    def __init__(self, delta: nn.Parameter) -> None:
        super().__init__()
        self.delta = delta  # [out]

    def apply_to(self, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def apply_to_bias(self, bias: torch.Tensor | None) -> torch.Tensor:
        return self.delta if bias is None else bias + self.delta.to(bias.dtype)

    def export(self, module: str, shape: tuple[int, int]) -> BiasDelta:
        return BiasDelta(module, self.delta.detach().cpu().clone())

    @classmethod
    def frozen(cls, part: ModulePart, device: torch.device) -> TrainableBias:
        assert isinstance(part, BiasDelta)
        return cls(nn.Parameter(part.delta.float().to(device).clone(), requires_grad=False))
