"""Sparse update `S` on its fixed support Ω, on a mixed batch.

Choice: Ω is tiny (DSEE uses 16 positions per matrix), so the correction for a task's rows is
a gather of the k input columns, a scale, and an `index_add_` into the k output columns —
O(rows × k), no weight-sized work at all. Folded into the materialised weight instead when the
task also has a keep mask on the module.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from adapters_store.format import SparseUpdate
from server.parts import PrepareContext, register_prepared


@register_prepared("sparse", "cpu")
class PreparedSparse:
    """Ω as (row, column) pairs plus values, on the device."""

    role = "correct"

    def __init__(self, part: SparseUpdate, context: PrepareContext) -> None:
        device, dtype = context.device, context.dtype
        in_features = part.shape[1]
        index = part.index.to(device)
        self.flat_index = index
        self.rows = torch.div(index, in_features, rounding_mode="floor")
        self.cols = index % in_features
        self.values = part.value.to(device=device, dtype=dtype)

    @property
    def nbytes(self) -> int:
        return (self.flat_index.numel() * 3) * 8 + self.values.numel() * self.values.element_size()

    def add_to_rows(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """y[:, r] += x[:, c] · v over Ω, for 2-D views of one task's rows."""
        y.index_add_(1, self.rows, x.index_select(1, self.cols) * self.values)

    def add_to_weight(self, weight: torch.Tensor) -> None:
        weight.view(-1).index_add_(0, self.flat_index, self.values)


@register_prepared("sparse", "triton")
class SortedSparse:
    """The Triton backend's sparse part: Ω's flat indices ascending, values alongside.

    Sorted once here so that the kernel finds a tile's entries by binary search instead of
    scattering with atomics (see `server/backends/triton_ops.py`).
    """

    role = "correct"
    table_fields: ClassVar[dict[str, torch.dtype]] = {"index_ptrs": torch.int64, "value_ptrs": torch.int64,
                                                      "nnz": torch.int32}

    def __init__(self, part: SparseUpdate, context: PrepareContext) -> None:
        order = torch.argsort(part.index)
        self.index = part.index[order].to(device=context.device, dtype=torch.int64).contiguous()
        self.values = part.value[order].to(device=context.device, dtype=context.dtype).contiguous()

    @property
    def nbytes(self) -> int:
        return self.index.numel() * 8 + self.values.numel() * self.values.element_size()

    def table_entries(self) -> dict[str, int]:
        return {"index_ptrs": self.index.data_ptr(), "value_ptrs": self.values.data_ptr(), "nnz": self.index.numel()}
