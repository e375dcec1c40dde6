"""Bit packing of keep masks, exactly as task-delta.md says.

Row-major flattening, 8 bits to a byte, first bit in the most significant position
(`numpy.packbits` default order), pad bits 0. numpy does the packing so the byte order
is numpy's by construction.
"""

from __future__ import annotations

import numpy as np
import torch


def packed_length(num_bits: int) -> int:
    return (num_bits + 7) // 8


def pack_bits(mask: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Pack a boolean (or 0/1) array of any shape into a flat uint8 tensor."""
    array = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    return torch.from_numpy(np.packbits(array.reshape(-1).astype(bool)))


def unpack_bits(packed: torch.Tensor | np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `pack_bits`: a bool tensor of `shape`."""
    array = packed.detach().cpu().numpy() if isinstance(packed, torch.Tensor) else np.asarray(packed)
    count = int(np.prod(shape))
    bits = np.unpackbits(array.astype(np.uint8), count=count)
    return torch.from_numpy(bits.astype(bool)).reshape(shape)


def pad_bits_are_zero(packed: torch.Tensor, num_bits: int) -> bool:
    spare = packed_length(num_bits) * 8 - num_bits
    if spare == 0:
        return True
    return int(packed[-1]) & ((1 << spare) - 1) == 0
