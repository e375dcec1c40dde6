"""The adapter store: the task-delta file format, its validation, and where deltas are kept.

Nothing here knows torch modules: a delta is tensors plus metadata, checked against a
plain description of the backbone (`BackboneSpec`).
"""

from adapters_store.format import (
    MODULE_PARTS,
    BackboneMismatch,
    BackboneSpec,
    DeltaMeta,
    HeadKeep,
    InvalidDelta,
    KeepMask,
    LowRank,
    ModulePart,
    PastaVectors,
    SparseUpdate,
    TaskDelta,
    TaskHead,
    parse_delta,
    register_module_part,
)
from adapters_store.packing import pack_bits, unpack_bits

__all__ = [
    "MODULE_PARTS",
    "BackboneMismatch",
    "BackboneSpec",
    "DeltaMeta",
    "HeadKeep",
    "InvalidDelta",
    "KeepMask",
    "LowRank",
    "ModulePart",
    "PastaVectors",
    "SparseUpdate",
    "TaskDelta",
    "TaskHead",
    "pack_bits",
    "parse_delta",
    "register_module_part",
    "unpack_bits",
]
