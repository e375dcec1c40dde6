"""Keep mask `W ⊙ K` on a mixed batch.

A task with a keep mask on a module has its rows taken out of the shared GEMM and multiplied
by `W ⊙ K`; its GEMM costs what those rows cost in the shared GEMM anyway, so the price of a
mask is producing `W ⊙ K` once per batch. Two exact ways, picked per module at load time,
whichever is *smaller* to keep resident (so a task never costs more than its delta):

- **zero positions, applied in place** (masks with few zeros — under ~6 %, as masking
  training gives): the flat positions of the zeros, stored as int16 gaps between consecutive
  zeros (2 bytes a zero; one `cumsum` decodes them). The shared weight itself is zeroed at
  those positions, the task's rows are multiplied, and the saved values are written back
  (bit-exact; in a `finally`; the engine runs one forward at a time). Cost O(zeros): no weight
  copy, no buffer. Low-rank and sparse parts of that task become corrections on its rows.
- **packed bits into a scratch buffer** (denser masks, e.g. DSEE's 20 % pruning): one
  `index_select` of a 256×8 lookup table by the packed bytes and one multiply write `W ⊙ K` into
  a reused buffer; low-rank and sparse parts are folded into the same buffer.

Why not the subtraction `x·(W ⊙ (1−K))ᵀ` as a sparse matmul: measured on this CPU with a
1536×384 weight and 128 rows, torch's CSR SpMM runs at ~12 GFLOP/s against ~160 GFLOP/s for
the dense GEMM: 0.62 ms per task and module at 5 % zeros, and growing with rows and density.
Why not a copy of W plus zeroing (tried): the 400 weight copies of a 16-task MiniLM batch cost
more than the GEMMs they feed at 32 tokens a row.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar

import numpy as np
import torch

from adapters_store.format import KeepMask
from server.parts import PrepareContext, register_prepared

_BIT_TABLES: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
_INT16_MAX = 32767
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)


def _zero_positions(packed: np.ndarray, count: int) -> np.ndarray:
    """Flat row-major indices of the 0 bits, unpacking only the bytes that hold one."""
    partial = np.flatnonzero(packed != 0xFF)
    bit = np.flatnonzero(np.unpackbits(packed[partial]) == 0)  # 1-D: several times faster than 2-D nonzero
    flat = partial[bit >> 3] * 8 + (bit & 7)
    return flat[flat < count]  # drop the pad bits


def _bit_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[256, 8]: row b holds the 8 bits of byte b, most significant first, as 0/1 values."""
    key = (device, dtype)
    if key not in _BIT_TABLES:
        shifts = torch.arange(7, -1, -1)
        _BIT_TABLES[key] = ((torch.arange(256).unsqueeze(1) >> shifts) & 1).to(device=device, dtype=dtype)
    return _BIT_TABLES[key]


@register_prepared("keep", "cpu")
class PreparedKeepMask:
    """The CPU backend's keep mask: zero positions (few zeros) or packed bits (see above)."""

    role = "replace"

    def __init__(self, part: KeepMask, context: PrepareContext) -> None:
        device = context.device
        self.shape = part.shape
        count = part.shape[0] * part.shape[1]
        packed = part.packed.numpy()
        zeros = count - int(_POPCOUNT[packed].sum())  # pad bits are 0, so they are not in the popcount
        self.zero_fraction = zeros / count
        self.packed: torch.Tensor | None = None
        self.zero_gaps: torch.Tensor | None = None
        if zeros * 2 < packed.size:
            flat = _zero_positions(packed, count)
            gaps = np.diff(flat, prepend=0)
            if gaps.size == 0 or gaps.max() <= _INT16_MAX:
                self.zero_gaps = torch.from_numpy(gaps.astype(np.int16)).to(device)
        if self.zero_gaps is None:
            # index_select wants int32/int64 indices: widen the bytes per use, keep them as uint8.
            self.packed = part.packed.to(device)

    @property
    def in_place(self) -> bool:
        """True when applied by zeroing the shared weight in place (`zeroed`), else `materialise_into`."""
        return self.zero_gaps is not None

    @property
    def nbytes(self) -> int:
        tensor = self.packed if self.packed is not None else self.zero_gaps
        assert tensor is not None
        return tensor.numel() * tensor.element_size()

    def _zero_index(self) -> torch.Tensor:
        assert self.zero_gaps is not None
        return torch.cumsum(self.zero_gaps, 0, dtype=torch.int64)

    @contextmanager
    def zeroed(self, weight: torch.Tensor) -> Iterator[torch.Tensor]:
        """Within the block, `weight` *is* `W ⊙ K`; its values are restored bit-exactly after."""
        flat_weight = weight.view(-1)
        index = self._zero_index()
        saved = flat_weight.index_select(0, index)
        flat_weight.index_fill_(0, index, 0.0)
        try:
            yield weight
        finally:
            flat_weight.index_copy_(0, index, saved)

    def materialise_into(self, weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`out = weight ⊙ K` (out is a scratch buffer of the weight's shape and dtype)."""
        if self.packed is None:
            out.copy_(weight)
            out.view(-1).index_fill_(0, self._zero_index(), 0.0)
            return out
        bits = _bit_table(weight.device, weight.dtype).index_select(0, self.packed.to(torch.int32)).view(-1)
        return torch.mul(weight, bits[: weight.numel()].view_as(weight), out=out)


@register_prepared("keep", "triton")
class PackedKeepMask:
    """The Triton backend's keep mask: the file's packed bits as they are, on the device.

    The grouped masked-linear kernel reads them tile by tile and unpacks them in registers, so
    nothing weight-sized is ever built and a task costs exactly its mask's bytes.
    """

    role = "replace"
    # Its entry in the backend's per-task device tables (see `server/backends/triton.py`).
    table_fields: ClassVar[dict[str, torch.dtype]] = {"mask_ptrs": torch.int64}

    def __init__(self, part: KeepMask, context: PrepareContext) -> None:
        from server.backends.triton_ops import MASK_PAD_BYTES

        self.shape = part.shape
        # A fresh, 16-byte aligned buffer with MASK_PAD_BYTES zeros after the bits: the masked GEMM
        # loads whole byte runs of a tile, the last ones past the bits (see `triton_ops._mask_bytes`).
        packed = part.packed.reshape(-1)
        self.padded = torch.zeros(packed.numel() + MASK_PAD_BYTES, dtype=torch.uint8, device=context.device)
        self.padded[: packed.numel()] = packed.to(context.device)
        self.packed = self.padded[: packed.numel()]

    @property
    def nbytes(self) -> int:
        return self.padded.numel()

    def table_entries(self) -> dict[str, int]:
        return {"mask_ptrs": self.packed.data_ptr()}
