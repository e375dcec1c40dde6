"""Sparse update `S` on its fixed support Ω, on a mixed batch.

Choice: Ω is tiny (DSEE uses 16 positions per matrix), so the correction for a task's rows is
a gather of the k input columns, a scale, and an `index_add_` into the k output columns —
O(rows × k), no weight-sized work at all. Folded into the materialised weight instead when the
task also has a keep mask on the module.
"""

from __future__ import annotations

import torch

from adapters_store.format import SparseUpdate


class PreparedSparse:
    def __init__(self, part: SparseUpdate, device: torch.device, dtype: torch.dtype) -> None:
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
