"""How each delta part is held on the device and applied to a mixed batch: one registry.

A part of task-delta.md's formula is a *format class* (`adapters_store.format`: keys, parsing,
validation, bytes, dense effect) plus one *prepared class per backend*, registered here with
`register_prepared(kind, backend...)`. `server.delta.prepare` builds a task's serving form from
this registry alone, and each backend plans a batch from the prepared parts' `role`:

- `input`   — transforms a module's input rows before anything else (head keep);
- `replace` — replaces the shared GEMM for the task's rows (the keep mask; at most one);
- `correct` — adds a correction on the task's rows after the GEMM (low rank, sparse);
- `output`  — adds a term that does not depend on the input to the task's output rows, after
  everything else (the bias delta).

Modules, one per part, mirroring `adapters_store.format`:

- `keep_mask`  — `W ⊙ K`
- `low_rank`   — `B · A`
- `sparse`     — `S` on Ω
- `bias`       — `δb` added to the module's bias
- `head_keep`  — pruned heads' context columns zeroed before the attention output projection
- `pasta`      — vectors added at special-token positions before each layer (not a module part)
- `task_head`  — the task's pooler and classifier (not a module part)

Every prepared part reports `nbytes`: what it keeps resident on the device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

import torch

from server.backends import BACKEND_NAMES

Role = Literal["input", "replace", "correct", "output"]
BACKENDS = BACKEND_NAMES  # prepared classes are registered per engine backend
HEAD_KEEP = "head_keep"  # the one module part keyed by layer in the file, by module when served


@dataclass(frozen=True)
class PrepareContext:
    """What preparing a part needs to know of where it will run."""

    device: torch.device
    dtype: torch.dtype
    head_dim: int


class PreparedPart(Protocol):
    role: ClassVar[Role]

    @property
    def nbytes(self) -> int: ...


_PREPARED: dict[str, dict[str, type]] = {backend: {} for backend in BACKENDS}


def register_prepared(kind: str, *backends: str) -> Callable[[type], type]:
    """Class decorator: `cls(part, context)` prepares a `kind` part for these backends."""

    def register(cls: type) -> type:
        for backend in backends:
            if kind in _PREPARED[backend]:
                raise ValueError(f"{backend}: a prepared class for {kind!r} is already registered")
            _PREPARED[backend][kind] = cls
        return cls

    return register


def prepared_class(backend: str, kind: str) -> type:
    try:
        return _PREPARED[backend][kind]
    except KeyError:
        raise LookupError(f"backend {backend!r} has no prepared form for part {kind!r}") from None


def prepare_part(backend: str, kind: str, part: Any, context: PrepareContext) -> PreparedPart:
    return prepared_class(backend, kind)(part, context)


class ModuleParts(dict):
    """kind -> prepared part, for everything one task changes on one linear module."""

    def with_role(self, role: Role) -> list[Any]:
        return [part for part in self.values() if part.role == role]

    @property
    def replacing(self) -> Any | None:
        """The part that takes the task's rows out of the shared GEMM (the keep mask), if any."""
        found = self.with_role("replace")
        return found[0] if found else None

    # Readable shortcuts for the parts the formula names today.
    @property
    def keep(self) -> Any | None:
        return self.get("keep")

    @property
    def low_rank(self) -> Any | None:
        return self.get("low_rank")

    @property
    def sparse(self) -> Any | None:
        return self.get("sparse")

    @property
    def bias(self) -> Any | None:
        return self.get("bias")

    @property
    def head_keep(self) -> Any | None:
        return self.get(HEAD_KEEP)

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in self.values())


def _register_builtin_parts() -> None:
    # Importing the part modules runs their `register_prepared` decorators.
    from server.parts import bias, head_keep, keep_mask, low_rank, sparse  # noqa: F401


_register_builtin_parts()
