"""The adapter store: the task-delta file format, its validation, and where deltas are kept.

Nothing here knows torch modules: a delta is tensors plus metadata, checked against a
plain description of the backbone (`BackboneSpec`).

- `format`: the file format and its validation (`parse_delta`);
- `store`: what every store is (`DeltaStore`, `TaskInfo`, the errors, ownership and quotas);
- `local`: `LocalDeltaStore`, a folder; `s3`: `S3DeltaStore`, a bucket shared by replicas (boto3, imported
  only when asked for);
- `open_store` (here): the store a location names.
"""

from __future__ import annotations

import os

from adapters_store.format import (
    MODULE_PARTS,
    BackboneMismatch,
    BackboneSpec,
    BiasDelta,
    DeltaMeta,
    EmbeddingShift,
    HeadKeep,
    InvalidDelta,
    KeepMask,
    LowRank,
    ModulePart,
    NormDelta,
    PastaVectors,
    SparseUpdate,
    TaskDelta,
    TaskHead,
    parse_delta,
    register_module_part,
)
from adapters_store.local import LocalDeltaStore
from adapters_store.packing import pack_bits, unpack_bits
from adapters_store.store import DEFAULT_MAX_DELTA_BYTES, DeltaStore

__all__ = [
    "MODULE_PARTS",
    "BackboneMismatch",
    "BackboneSpec",
    "BiasDelta",
    "DeltaMeta",
    "DeltaStore",
    "EmbeddingShift",
    "HeadKeep",
    "InvalidDelta",
    "KeepMask",
    "LocalDeltaStore",
    "LowRank",
    "ModulePart",
    "NormDelta",
    "PastaVectors",
    "SparseUpdate",
    "TaskDelta",
    "TaskHead",
    "open_store",
    "pack_bits",
    "parse_delta",
    "register_module_part",
    "unpack_bits",
]


def open_store(location: str | os.PathLike[str], spec: BackboneSpec, *,
               max_delta_bytes: int = DEFAULT_MAX_DELTA_BYTES, **s3_options: object) -> DeltaStore:
    """The store at `location`: `s3://bucket/prefix` → `S3DeltaStore` (options passed on), else a folder."""
    if str(location).startswith("s3://"):
        from adapters_store.s3 import S3DeltaStore  # boto3 only when an S3 store is asked for

        return S3DeltaStore(str(location), spec, max_delta_bytes=max_delta_bytes, **s3_options)  # type: ignore[arg-type]
    return LocalDeltaStore(location, spec, max_delta_bytes=max_delta_bytes)
