"""A task delta made ready for the engine: validated, on the device, in its serving form.

`prepare_delta` is the one function from a delta's bytes to a ready `PreparedDelta`
(validation included); it is what the device cache calls on a miss and what the cold-load
benchmark times.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from adapters_store.format import DeltaMeta, TaskDelta, parse_delta
from server.backbone import Backbone
from server.parts.head_keep import PreparedHeadKeep
from server.parts.keep_mask import PreparedKeepMask
from server.parts.low_rank import PreparedLowRank
from server.parts.pasta import PreparedPasta
from server.parts.sparse import PreparedSparse
from server.parts.task_head import PreparedTaskHead


@dataclass(frozen=True)
class ModuleParts:
    """Everything one task changes on one linear module."""

    keep: PreparedKeepMask | None = None
    low_rank: PreparedLowRank | None = None
    sparse: PreparedSparse | None = None
    head_keep: PreparedHeadKeep | None = None  # only on attention output projections


@dataclass(eq=False)
class PreparedDelta:
    """Only the serving form is kept: the parsed file's tensors are dropped once prepared."""

    name: str
    version: int
    meta: DeltaMeta
    head: PreparedTaskHead
    modules: dict[str, ModuleParts] = field(default_factory=dict)
    pasta: PreparedPasta | None = None
    load_seconds: float = 0.0

    @property
    def key(self) -> tuple[str, int]:
        return (self.name, self.version)

    @property
    def has_keep_mask(self) -> bool:
        return any(parts.keep is not None for parts in self.modules.values())

    @property
    def nbytes(self) -> int:
        """Bytes this task keeps resident on the device."""
        total = self.head.nbytes + (self.pasta.nbytes if self.pasta else 0)
        for parts in self.modules.values():
            for part in (parts.keep, parts.low_rank, parts.sparse, parts.head_keep):
                if part is not None:
                    total += part.nbytes
        return total


def prepare(delta: TaskDelta, backbone: Backbone, name: str, version: int) -> PreparedDelta:
    """Move an already validated delta to the backbone's device in its serving form."""
    started = time.perf_counter()
    device, dtype = backbone.device, backbone.dtype
    modules: dict[str, ModuleParts] = {}
    for module in delta.modules():
        keep, low_rank, sparse = delta.keep.get(module), delta.low_rank.get(module), delta.sparse.get(module)
        modules[module] = ModuleParts(
            keep=PreparedKeepMask(keep, device) if keep else None,
            low_rank=PreparedLowRank(low_rank, device, dtype) if low_rank else None,
            sparse=PreparedSparse(sparse, device, dtype) if sparse else None,
        )
    for layer, head_keep in delta.head_keep.items():
        if not head_keep.dropped_heads:
            continue
        module = backbone.attention_output_modules[layer]
        existing = modules.get(module, ModuleParts())
        modules[module] = ModuleParts(
            existing.keep, existing.low_rank, existing.sparse, PreparedHeadKeep(head_keep, backbone.head_dim, device)
        )
    prepared = PreparedDelta(
        name=name,
        version=version,
        meta=delta.meta,
        head=PreparedTaskHead(delta.head, device, dtype),
        modules=modules,
        pasta=PreparedPasta(delta.pasta, device, dtype) if delta.pasta is not None else None,
    )
    prepared.load_seconds = time.perf_counter() - started
    return prepared


def prepare_delta(data: bytes, backbone: Backbone, name: str, version: int = 1) -> PreparedDelta:
    """Bytes of a delta file -> validated, device-ready delta. Raises InvalidDelta/BackboneMismatch."""
    started = time.perf_counter()
    prepared = prepare(parse_delta(data, backbone.spec()), backbone, name, version)
    prepared.load_seconds = time.perf_counter() - started
    return prepared
