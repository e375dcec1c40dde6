"""The adapter store: the task-delta file format, its validation, and where deltas are kept.

Nothing here knows torch modules: a delta is tensors plus metadata, checked against a
plain description of the backbone (`BackboneSpec`).
"""

from adapters_store.format import (
    BackboneMismatch,
    BackboneSpec,
    DeltaMeta,
    HeadKeep,
    InvalidDelta,
    KeepMask,
    LowRank,
    PastaVectors,
    SparseUpdate,
    TaskDelta,
    TaskHead,
    parse_delta,
)
from adapters_store.packing import pack_bits, unpack_bits

__all__ = [
    "BackboneMismatch",
    "BackboneSpec",
    "DeltaMeta",
    "HeadKeep",
    "InvalidDelta",
    "KeepMask",
    "LowRank",
    "PastaVectors",
    "SparseUpdate",
    "TaskDelta",
    "TaskHead",
    "pack_bits",
    "parse_delta",
    "unpack_bits",
]
