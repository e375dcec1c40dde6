"""PASTA vectors: added to special tokens' hidden states before every layer.

Choice: once per batch, the (row, position) of every special token whose task has a vector for
its slot is gathered together with that vector for every layer ([layers, E, d], E = number of
such tokens in the batch). Before layer l runs, one `index_put_` adds the whole batch's vectors.
Rows of tasks without PASTA are simply absent from E.
"""

from __future__ import annotations

import torch

from adapters_store.format import PastaVectors


class PreparedPasta:
    def __init__(self, part: PastaVectors, device: torch.device, dtype: torch.dtype) -> None:
        self.vectors = part.vectors.to(device=device, dtype=dtype)  # [layers, P, d]

    @property
    def nbytes(self) -> int:
        return self.vectors.numel() * self.vectors.element_size()

    @property
    def slots(self) -> int:
        return self.vectors.shape[1]


class PastaBatch:
    """The PASTA additions of a whole mixed batch, ready for each layer's pre-hook."""

    def __init__(self, rows: torch.Tensor, positions: torch.Tensor, vectors: torch.Tensor) -> None:
        self.rows = rows
        self.positions = positions
        self.vectors = vectors  # [layers, E, d]

    @classmethod
    def build(
        cls, slots: torch.Tensor, segments: list[tuple[int, int, PreparedPasta | None]]
    ) -> PastaBatch | None:
        """`slots` is [N, L] special-token slot numbers (-1 elsewhere) for the sorted batch."""
        rows, positions, vectors = [], [], []
        for start, end, pasta in segments:
            if pasta is None:
                continue
            seg_slots = slots[start:end]
            hit = (seg_slots >= 0) & (seg_slots < pasta.slots)
            r, p = hit.nonzero(as_tuple=True)
            if r.numel() == 0:
                continue
            rows.append(r + start)
            positions.append(p)
            vectors.append(pasta.vectors[:, seg_slots[r, p]])
        if not rows:
            return None
        return cls(torch.cat(rows), torch.cat(positions), torch.cat(vectors, dim=1))

    def add_before_layer(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        out = hidden.clone()
        out.index_put_((self.rows, self.positions), self.vectors[layer], accumulate=True)
        return out
