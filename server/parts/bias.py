"""Bias delta `δb`: each task's own change of a linear module's bias, on a mixed batch.

Choice: the part adds one vector to the task's output rows after everything else (role
`output`), which is `x Wᵀ + (b + δb)` whatever the other parts did: it never touches the
shared weight or the scratch buffer of a keep mask. On the CPU that is one broadcast add on the
segment's view. The Triton backend keeps one row per task slot in a per-module table (zeros for
tasks without the part) and adds every row's vector in one gather and one add per module,
whatever the number of tasks; a vector of `out` values is too small to be worth a kernel.
"""

from __future__ import annotations

import torch

from adapters_store.format import BiasDelta
from server.parts import PrepareContext, register_prepared


@register_prepared("bias", "cpu", "triton")
class PreparedBias:
    """δb on the device in the backbone's dtype."""

    role = "output"

    def __init__(self, part: BiasDelta, context: PrepareContext) -> None:
        self.delta = part.delta.to(device=context.device, dtype=context.dtype).contiguous()  # [out]

    @property
    def nbytes(self) -> int:
        return self.delta.numel() * self.delta.element_size()

    def add_to_output(self, y: torch.Tensor) -> None:
        """y[rows] += δb for a view y [..., out] of one task's rows."""
        y.add_(self.delta)
