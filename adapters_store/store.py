"""What every store is and shares: the `DeltaStore` protocol, `TaskInfo` (a manifest entry), the errors,
the task-name rule, the checks every upload passes before a byte is written, and tenants' ownership
and quotas (checked by each store atomically with its write).

The stores: `adapters_store.local.LocalDeltaStore` (a folder) and `adapters_store.s3.S3DeltaStore` (a
bucket shared by replicas); `adapters_store.open_store` picks one from a location. A store knows no
torch module: it reads bytes, asks `parse_delta` whether they are valid against a `BackboneSpec`, and
keeps what the manifest needs.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Protocol

from adapters_store.format import BackboneSpec, InvalidDelta, TaskDelta, parse_delta

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "deltaserve-store/1"
DEFAULT_MAX_DELTA_BYTES = 64 * 1024 * 1024


class StoreError(Exception):
    """Base of the store's own errors (invalid deltas raise `InvalidDelta` from the format)."""


class InvalidTaskName(StoreError, ValueError):
    def __init__(self, name: str) -> None:
        super().__init__(f"task name {name!r} must match {NAME_PATTERN.pattern}")


class TaskNotFound(StoreError, KeyError):
    def __init__(self, name: str, version: int | None = None) -> None:
        self.name = name
        self.version = version
        what = f"task {name!r}" if version is None else f"version {version} of task {name!r}"
        super().__init__(f"{what} not found")

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class DeltaTooLarge(StoreError, ValueError):
    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"delta is {size} bytes; the limit is {limit} bytes")


class NameTaken(StoreError):
    """The name belongs to another owner: names are global, so a tenant cannot take another's (HTTP 409)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"task name {name!r} is taken; choose another name")


class QuotaExceeded(StoreError):
    """An upload would take its owner past one of its quotas; nothing was stored (HTTP 403)."""


@dataclass(frozen=True)
class Quota:
    """An owner's limits (None: no limit), checked by the store under the same lock as the write."""

    max_tasks: int | None = None
    max_delta_bytes: int | None = None

    def check(self, owner: str, tasks: Iterable[TaskInfo], name: str, new_bytes: int) -> None:
        """QuotaExceeded when storing `new_bytes` as task `name` takes `owner` past a limit (a replace frees
        the bytes of the version it replaces)."""
        others = [info for info in tasks if info.owner == owner and info.name != name]
        if self.max_tasks is not None and len(others) + 1 > self.max_tasks:
            raise QuotaExceeded(f"tenant {owner!r} has {len(others)} tasks; its max_tasks quota is "
                                f"{self.max_tasks}; nothing was stored")
        used = sum(info.delta_bytes for info in others)
        if self.max_delta_bytes is not None and used + new_bytes > self.max_delta_bytes:
            raise QuotaExceeded(f"tenant {owner!r} stores {used} bytes of deltas and this one has {new_bytes}; "
                                f"its max_delta_bytes quota is {self.max_delta_bytes}; nothing was stored")


def check_owner(current: TaskInfo | None, name: str, owner: str | None) -> None:
    """A write by `owner` (None: the operator, who may write anything) to a task another owns: NameTaken."""
    if owner is not None and current is not None and current.owner != owner:
        raise NameTaken(name)


def owned_info(info: TaskInfo | None, name: str, owner: str | None) -> TaskInfo:
    """`info` when `owner` may see it (None: the operator sees all); else TaskNotFound, as if absent."""
    if info is None or (owner is not None and info.owner != owner):
        raise TaskNotFound(name)
    return info


class StoreCorrupt(StoreError, RuntimeError):
    """A stored file no longer matches its manifest entry (changed or lost on disk)."""


class StoreUnavailable(StoreError, RuntimeError):
    """A remote store (S3) cannot be reached or refused a request: not the client's mistake (HTTP 503)."""


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):  # fullmatch: `$` alone would accept a trailing newline
        raise InvalidTaskName(name)
    return name


def validate_upload(name: str, data: bytes, spec: BackboneSpec, max_delta_bytes: int) -> TaskDelta:
    """Everything an upload must pass before any store writes a byte: name, size, the whole format."""
    check_name(name)
    if len(data) > max_delta_bytes:
        raise DeltaTooLarge(len(data), max_delta_bytes)
    return parse_delta(data, spec)


def check_sha256(data: bytes, info: TaskInfo, what: str) -> bytes:
    """`data` if it is the version `info` names (its sha256), else StoreCorrupt naming `what` was read."""
    if hashlib.sha256(data).hexdigest() != info.sha256:
        raise StoreCorrupt(f"the {what} of task {info.name!r} version {info.version} does not match its sha256")
    return data


@dataclass(frozen=True)
class TaskInfo:
    """One task as the manifest keeps it and `GET /tasks` shows it."""

    name: str
    version: int
    sha256: str
    delta_bytes: int
    created_at: str
    method: str
    task_type: str
    labels: list[str]
    description: str = ""
    problem_type: str = "single_label"
    max_length: int | None = None
    word_piece: str = "first"
    backbone_fingerprint: str = ""
    head_bytes: int = 0
    bytes_by_part: dict[str, int] = field(default_factory=dict)
    owner: str | None = None  # the tenant whose key created it; None: the operator's
    # What the head reads (task-delta.md): cls or mean for sequence classification and embedding
    # (None in entries written before pooling existed: cls), and an embedding's vector.
    pooling: str | None = None
    normalize: bool | None = None  # embedding only
    embedding_size: int | None = None  # embedding only: D, the vector's length

    @classmethod
    def from_delta(cls, name: str, version: int, data: bytes, delta: TaskDelta, owner: str | None = None,
                   hidden_size: int | None = None) -> TaskInfo:
        """`hidden_size` (the backbone's) sizes an embedding without a projection."""
        meta = delta.meta
        embedding_size = delta.head.output_size(hidden_size) if meta.is_embedding and hidden_size else None
        return cls(
            name=name,
            version=version,
            sha256=hashlib.sha256(data).hexdigest(),
            delta_bytes=len(data),
            created_at=datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            method=meta.method,
            task_type=meta.task_type,
            labels=list(meta.labels),
            description=meta.description,
            problem_type=meta.problem_type,
            max_length=meta.max_length,
            word_piece=meta.word_piece,
            backbone_fingerprint=meta.backbone_fingerprint,
            head_bytes=delta.head.nbytes,
            bytes_by_part=delta.bytes_by_part(),
            owner=owner,
            pooling=meta.pooling,
            normalize=meta.normalize if meta.is_embedding else None,
            embedding_size=embedding_size,
        ).answerable()

    def answerable(self) -> TaskInfo:
        """This info, once it is known to encode as the UTF-8 JSON every listing answers with.

        Checked before the store commits anything: an entry that cannot be answered would turn
        each later listing into a 500 until it is deleted. (`parse_delta` already refuses what
        could cause it; this keeps the store's promise whatever a future field holds.)
        """
        try:
            json.dumps(self.to_dict(), ensure_ascii=False, allow_nan=False).encode("utf-8")
        except (UnicodeEncodeError, ValueError) as err:
            raise InvalidDelta("__metadata__", f"cannot be answered as UTF-8 JSON ({type(err).__name__})") from None
        return self

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> TaskInfo:
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in known})  # type: ignore[arg-type]


class DeltaStore(Protocol):
    """Where task deltas live. Implementations are safe to call from several threads."""

    created: bool  # whether opening it made it (a brand-new store gets the demo tasks)

    def list(self) -> list[TaskInfo]: ...

    def get_info(self, name: str) -> TaskInfo | None: ...

    def read_bytes(self, name: str, version: int | None = None) -> bytes:
        """The file of `version` (default: the current one); `TaskNotFound` when it is gone."""
        ...

    def put(self, name: str, data: bytes, owner: str | None = None,
            quota: Quota | None = None) -> tuple[TaskInfo, bool]:
        """Validate and store a new version; returns its info and whether the task is new.

        `owner` None is the operator: it may replace any task, which keeps its owner. A tenant's `owner`
        may create a task (recorded as its) or replace its own: `NameTaken` when another owns the name,
        `QuotaExceeded` past `quota`, both checked atomically with the write."""
        ...

    def delete(self, name: str, owner: str | None = None) -> TaskInfo:
        """Remove a task; returns what was removed; `TaskNotFound` when unknown (or, with `owner`, not its)."""
        ...

    def on_change(self, listener: Callable[[set[str]], None]) -> None:
        """Call `listener(names)` when another process replaced or deleted tasks (a store that cannot see
        them, such as a folder, never calls it)."""
        ...

    def close(self) -> None:
        """Stop what the store runs in the background (the S3 store's watcher)."""
        ...

    def problem(self) -> str | None:
        """Why the store cannot serve now (a sentence), or None: the readiness probes answer 503 with it."""
        ...
