"""Head keep: pruned attention heads contribute nothing.

Choice: zero the pruned heads' slice of the attention context for the task's rows, in place,
right before the attention output projection runs. That is exactly the spec's definition and
costs one `index_fill_` per task and layer; the projection's shared GEMM, keep mask, low-rank
and sparse parts then all see the zeroed input, as the formula requires.
"""

from __future__ import annotations

import torch

from adapters_store.format import HeadKeep
from server.parts import HEAD_KEEP, PrepareContext, register_prepared


@register_prepared(HEAD_KEEP, "cpu")
class PreparedHeadKeep:
    """The CPU backend's head keep: the dropped heads' column indices, zeroed per task segment."""

    role = "input"

    def __init__(self, part: HeadKeep, context: PrepareContext) -> None:
        head_dim = context.head_dim
        columns = [h * head_dim + i for h in part.dropped_heads for i in range(head_dim)]
        self.columns = torch.tensor(columns, dtype=torch.int64, device=context.device)

    @property
    def nbytes(self) -> int:
        return self.columns.numel() * self.columns.element_size()

    def zero_rows(self, x: torch.Tensor) -> None:
        """Zero the pruned heads' columns of x [n, L, d] (one task's rows) in place."""
        if self.columns.numel():
            x.index_fill_(-1, self.columns, 0.0)


@register_prepared(HEAD_KEEP, "triton")
class HeadKeepVector:
    """The Triton backend's head keep: the 0/1 keep of each head, in the backbone's dtype.

    A batch stacks one such vector per row ([rows, heads], ones for tasks without head keep)
    and multiplies the attention context by it in one op for the whole batch.
    """

    role = "input"

    def __init__(self, part: HeadKeep, context: PrepareContext) -> None:
        self.keep = part.keep.to(device=context.device, dtype=context.dtype)

    @property
    def nbytes(self) -> int:
        return self.keep.numel() * self.keep.element_size()
