"""Keep mask `W ⊙ K` on a mixed batch.

Choice: a task with a keep mask on a module has its rows taken out of the shared GEMM and
multiplied by `W ⊙ K` built on the fly in a reused scratch buffer (one `index_select` of a
256×8 lookup table by the packed bytes, one multiply). Only the packed bits stay resident
(1/32 of the float32 weight), so a task costs its delta, not a copy.

Why not the subtraction `x·(W ⊙ (1−K))ᵀ` as a sparse matmul: measured on this CPU with a
1536×384 weight and 128 rows, torch's CSR SpMM runs at ~12 GFLOP/s against ~160 GFLOP/s for
the dense GEMM, so at 5 % zeros it costs 0.62 ms per task and module, while building `W ⊙ K`
costs 0.29 ms and the GEMM on the swapped-out rows costs what those rows cost in the shared
GEMM anyway. It also keeps the cost independent of the mask's density (DSEE prunes 20 %+).
Low-rank and sparse parts of the same task and module are folded into the same buffer, so
such a task pays one GEMM and no corrections.
"""

from __future__ import annotations

import torch

from adapters_store.format import KeepMask

_LUTS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _bit_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[256, 8]: row b holds the 8 bits of byte b, most significant first, as 0/1 floats."""
    key = (device, dtype)
    if key not in _LUTS:
        shifts = torch.arange(7, -1, -1)
        table = (torch.arange(256).unsqueeze(1) >> shifts) & 1
        _LUTS[key] = table.to(device=device, dtype=dtype)
    return _LUTS[key]


class PreparedKeepMask:
    def __init__(self, part: KeepMask, device: torch.device) -> None:
        self.shape = part.shape
        self.packed = part.packed.to(device)
        # index_select wants int indices; keep the packed bytes as they are and widen per use.
        self.zero_fraction = 1.0 - _popcount(part.packed) / (part.shape[0] * part.shape[1])

    @property
    def nbytes(self) -> int:
        return self.packed.numel()

    def materialise_into(self, weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`out = weight ⊙ K` (out is a scratch buffer of the weight's shape and dtype)."""
        table = _bit_table(weight.device, weight.dtype)
        count = weight.numel()
        bits = table.index_select(0, self.packed.to(torch.int32)).view(-1)
        if bits.numel() != count:
            bits = bits[:count]
        return torch.mul(weight, bits.view_as(weight), out=out)


def _popcount(packed: torch.Tensor) -> int:
    table = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)
    return int(table[packed.to(torch.int64)].sum())
