"""The CPU backend: the formula per task segment, shaped for BLAS on a few cores.

Every linear module becomes a `CpuLinear`; for a batch whose rows belong to different tasks
it computes per row

    y = x (W ⊙ K + B·A + S)ᵀ + b        (with K, B·A, S of that row's task; absent = identity)

Rows are sorted so that each task's rows are contiguous (a *segment*). Per module:

- rows of tasks with no part there are covered by the shared GEMM, once, for all of them;
- a task with a keep mask there (the `replace` role) is swapped out of the shared GEMM and
  multiplied by `W ⊙ K`: the shared weight zeroed in place and restored (few zeros), or
  `W ⊙ K (+ B·A + S)` built in a scratch buffer (dense masks); see `parts/keep_mask.py`;
- other tasks get in-place corrections on their rows (`correct` role): `B·A` by two small
  GEMMs, `S` by an index-add (see `parts/low_rank.py`, `parts/sparse.py`);
- pruned heads (`input` role) zero their context columns before the attention output projection;
- a bias delta (`output` role) is added to its task's output rows last (see `parts/bias.py`).

Why per segment on a CPU: a few big BLAS calls beat any gather, and launches are free. A
few-zero keep mask briefly zeroes the shared weight in place, which is why the engine runs one
forward at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from server.backends import Backend, BackendLinear, Segment
from server.parts import ModuleParts


@dataclass
class ModulePlan:
    """What one linear module does for one batch; rows are ranges of the sorted batch."""

    num_rows: int
    inputs: list[tuple[int, int, Any]] = field(default_factory=list)
    replaced: list[tuple[int, int, ModuleParts]] = field(default_factory=list)
    corrections: list[tuple[int, int, ModuleParts]] = field(default_factory=list)
    outputs: list[tuple[int, int, Any]] = field(default_factory=list)

    def shared_runs(self) -> list[tuple[int, int]]:
        """Maximal row ranges not swapped out of the shared GEMM."""
        runs, cursor = [], 0
        for start, end, _ in sorted(self.replaced, key=lambda item: item[0]):
            if start > cursor:
                runs.append((cursor, start))
            cursor = end
        if cursor < self.num_rows:
            runs.append((cursor, self.num_rows))
        return runs


class ScratchPool:
    """One reusable weight-sized buffer per shape: where `W ⊙ K` is materialised."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[tuple[int, ...], torch.dtype, torch.device], torch.Tensor] = {}

    def get(self, like: torch.Tensor) -> torch.Tensor:
        key = (tuple(like.shape), like.dtype, like.device)
        if key not in self._buffers:
            self._buffers[key] = torch.empty_like(like)
        return self._buffers[key]

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


def _linear_into(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    x2 = x.reshape(-1, x.shape[-1])
    out2 = out.view(-1, out.shape[-1])
    if bias is None:
        torch.mm(x2, weight.t(), out=out2)
    else:
        torch.addmm(bias, x2, weight.t(), out=out2)


def _add_corrections(x: torch.Tensor, y: torch.Tensor, parts: ModuleParts) -> None:
    """`correct`-role parts (low rank, sparse) in place on one task's rows."""
    x_rows = x.reshape(-1, x.shape[-1])
    y_rows = y.view(-1, y.shape[-1])
    for part in parts.with_role("correct"):
        part.add_to_rows(x_rows, y_rows)


class CpuLinear(BackendLinear):
    """An `nn.Linear` that applies each row's task parts: the formula, in one place for the CPU."""

    scratch: ScratchPool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan: ModulePlan | None = self.plan
        if plan is None:
            return F.linear(x, self.weight, self.bias)
        if x.shape[0] != plan.num_rows:
            raise RuntimeError(f"{self.module_name}: expected {plan.num_rows} rows on dim 0, got {tuple(x.shape)}")
        if plan.inputs:
            x = x.clone()  # the attention context may be referenced elsewhere; never edit the caller's tensor
            for start, end, part in plan.inputs:
                part.zero_rows(x[start:end])
        if plan.replaced:
            x = x.contiguous()
            y = x.new_empty((*x.shape[:-1], self.out_features))
            for start, end in plan.shared_runs():
                _linear_into(x[start:end], self.weight, self.bias, y[start:end])
            for start, end, parts in plan.replaced:
                keep = parts.replacing
                if keep.in_place:
                    with keep.zeroed(self.weight) as masked:
                        _linear_into(x[start:end], masked, self.bias, y[start:end])
                    _add_corrections(x[start:end], y[start:end], parts)
                else:
                    buffer = keep.materialise_into(self.weight, self.scratch.get(self.weight))
                    for part in parts.with_role("correct"):
                        part.add_to_weight(buffer)
                    _linear_into(x[start:end], buffer, self.bias, y[start:end])
        else:
            y = F.linear(x, self.weight, self.bias)
        for start, end, parts in plan.corrections:
            _add_corrections(x[start:end], y[start:end], parts)
        for start, end, part in plan.outputs:
            part.add_to_output(y[start:end])
        return y


class CpuBackend(Backend):
    name = "cpu"
    linear_class = CpuLinear

    def __init__(self, backbone: Any) -> None:
        super().__init__(backbone)
        self.scratch = ScratchPool()
        self.install()

    def install(self) -> None:
        super().install()
        for module in self.linears.values():  # also modules an earlier engine on this backbone installed
            module.scratch = self.scratch  # type: ignore[attr-defined]

    def plan(self, segments: Sequence[Segment], seq_len: int) -> dict[str, ModulePlan]:
        num_rows = segments[-1][1] if segments else 0
        plans: dict[str, ModulePlan] = {}
        for start, end, delta in segments:
            for name, parts in delta.modules.items():
                plan = plans.get(name)
                if plan is None:
                    plan = plans[name] = ModulePlan(num_rows)
                plan.inputs.extend((start, end, part) for part in parts.with_role("input"))
                plan.outputs.extend((start, end, part) for part in parts.with_role("output"))
                if parts.replacing is not None:
                    plan.replaced.append((start, end, parts))
                elif parts.with_role("correct"):
                    plan.corrections.append((start, end, parts))
        return plans
