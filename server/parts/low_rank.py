"""Low-rank update `B · A` on a mixed batch.

Choice: segment by segment (LoRAX/Punica's SGMV idea without a custom kernel): each task's
rows are contiguous, so its correction is two small GEMMs on a view of the batch,
`y += (x Aᵀ) Bᵀ`, written in place with `addmm_`. Rows of other tasks pay nothing. When the
same task also has a keep mask on the module, `B·A` is folded into the materialised weight
instead (`addmm_` on the scratch buffer), which is cheaper than a correction there.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from adapters_store.format import LowRank
from server.parts import PrepareContext, register_prepared


@register_prepared("low_rank", "cpu", "triton")
class PreparedLowRank:
    """A, B on the device in the backbone's dtype, contiguous (the Triton kernels read them by pointer)."""

    role = "correct"
    # Its entries in the Triton backend's per-task device tables (see `server/backends/triton.py`).
    table_fields: ClassVar[dict[str, torch.dtype]] = {"lora_a": torch.int64, "lora_b": torch.int64,
                                                      "ranks": torch.int32}

    def __init__(self, part: LowRank, context: PrepareContext) -> None:
        device, dtype = context.device, context.dtype
        self.A = part.A.to(device=device, dtype=dtype).contiguous()  # [r, in]
        self.B = part.B.to(device=device, dtype=dtype).contiguous()  # [out, r]
        self._A_t = self.A.t()
        self._B_t = self.B.t()

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def nbytes(self) -> int:
        return (self.A.numel() + self.B.numel()) * self.A.element_size()

    def add_to_rows(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """y[rows] += x[rows] Aᵀ Bᵀ for 2-D views x [n, in], y [n, out] of one task's rows."""
        y.addmm_(x @ self._A_t, self._B_t)

    def add_to_weight(self, weight: torch.Tensor) -> None:
        weight.addmm_(self.B, self.A)

    def table_entries(self) -> dict[str, int]:
        """Its entries in the Triton backend's per-task device tables (see `server/backends/triton.py`)."""
        return {"lora_a": self.A.data_ptr(), "lora_b": self.B.data_ptr(), "ranks": self.rank}
