"""Head keep: pruned attention heads contribute nothing.

Choice: zero the pruned heads' slice of the attention context for the task's rows, in place,
right before the attention output projection runs. That is exactly the spec's definition and
costs one `index_fill_` per task and layer; the projection's shared GEMM, keep mask, low-rank
and sparse parts then all see the zeroed input, as the formula requires.
"""

from __future__ import annotations

import torch

from adapters_store.format import HeadKeep


class PreparedHeadKeep:
    def __init__(self, part: HeadKeep, head_dim: int, device: torch.device) -> None:
        columns = [h * head_dim + i for h in part.dropped_heads for i in range(head_dim)]
        self.columns = torch.tensor(columns, dtype=torch.int64, device=device)

    @property
    def nbytes(self) -> int:
        return self.columns.numel() * self.columns.element_size()

    def zero_rows(self, x: torch.Tensor) -> None:
        """Zero the pruned heads' columns of x [n, L, d] (one task's rows) in place."""
        if self.columns.numel():
            x.index_fill_(-1, self.columns, 0.0)
