"""PASTA vectors: added to special tokens' hidden states before every layer.

Choice: once per batch, the (row, position) of every special token whose task has a vector for
its slot is found on the host, from the tokenizer's special-token masks (host lists already: no
device work, no sync), and uploaded in one non-blocking copy with the slot numbers; each PASTA
task's vectors for those tokens are then gathered ([layers, E, d], E = number of such tokens in
the batch) without waiting for anything. Before layer l runs, one `index_put_` adds the whole
batch's vectors. Rows of tasks without PASTA are simply absent from E.
"""

from __future__ import annotations

from collections.abc import Sequence

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
    def build(cls, special_masks: Sequence[Sequence[int] | None],
              segments: list[tuple[int, int, PreparedPasta | None]], device: torch.device) -> PastaBatch | None:
        """`special_masks[i]` is row i's special-token mask (1 where the tokenizer inserted a token) in
        the sorted batch; slot j is a row's j-th special token, counted from 0 left to right."""
        from server.backends.uploads import upload_int_tables

        rows: list[int] = []
        positions: list[int] = []
        entries: list[int] = []  # each token's vector: its column in the batch's PASTA tasks' vectors, side by side
        tasks: list[PreparedPasta] = []
        first = 0  # the current task's first column there
        for start, end, pasta in segments:
            if pasta is None:
                continue
            before = len(rows)
            for row in range(start, end):
                mask = special_masks[row]
                if mask is None:
                    raise ValueError("PASTA slots need the tokenizer's special_tokens_mask for every text")
                position = -1
                for slot in range(pasta.slots):  # the row's first `slots` special tokens, found by C-speed scans
                    try:
                        position = mask.index(1, position + 1)
                    except ValueError:
                        break
                    rows.append(row)
                    positions.append(position)
                    entries.append(first + slot)
            if len(rows) > before:
                tasks.append(pasta)
                first += pasta.slots
        if not rows:
            return None
        row_t, position_t, entry_t = upload_int_tables([rows, positions, entries], torch.int64, device)
        # Two device ops whatever the number of PASTA tasks: their vectors side by side, then one gather.
        table = tasks[0].vectors if len(tasks) == 1 else torch.cat([task.vectors for task in tasks], dim=1)
        return cls(row_t, position_t, table.index_select(1, entry_t))

    def add_before_layer(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        out = hidden.clone()
        out.index_put_((self.rows, self.positions), self.vectors[layer], accumulate=True)
        return out
