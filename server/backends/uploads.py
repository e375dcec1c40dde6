"""Small integer tables to the device: several in one copy, each slice 16-byte aligned, non-blocking.

Per batch the engine sends a few integer tables (row tiles, task slots, PASTA positions). One copy
instead of one per table, and from page-locked memory so that it does not wait for the forward
in flight (a copy from pageable memory blocks the host until the device has taken it). Aligned
because Triton compiles a kernel per pointer alignment: slices at arbitrary offsets of one buffer
would make the same launch compile again for another batch.
"""

from __future__ import annotations

import torch

ALIGN_BYTES = 16  # Triton specialises every pointer argument on this alignment


def aligned_length(length: int, dtype: torch.dtype) -> int:
    """`length` rounded up so that a table slice that follows starts 16-byte aligned."""
    per = ALIGN_BYTES // torch.empty((), dtype=dtype).element_size()
    return -(-length // per) * per


def upload_int_tables(tables: list[list[int]], dtype: torch.dtype, device: torch.device | str,
                      pin: bool = True) -> list[torch.Tensor]:
    """The tables on `device` in ONE copy (one slice each, 16-byte aligned); non-blocking from pinned
    memory when `pin` and CUDA is there (the host buffer's lifetime is the caching allocator's care)."""
    flat: list[int] = []
    offsets = []
    for table in tables:
        offsets.append(len(flat))
        flat.extend(table)
        flat.extend([0] * (aligned_length(max(len(table), 1), dtype) - len(table)))
    host = torch.tensor(flat, dtype=dtype)
    if pin and torch.device(device).type == "cuda":
        host = host.pin_memory()
    on_device = host.to(device, non_blocking=True)
    return [on_device[offset:offset + len(table)] for offset, table in zip(offsets, tables, strict=True)]


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor on `device`, non-blocking from pinned memory where that is CUDA."""
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
