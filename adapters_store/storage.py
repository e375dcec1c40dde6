"""The adapter store: task deltas kept on disk, one file per task version plus a JSON manifest.

`DeltaStore` is the small interface the server uses (list / get_info / read_bytes / put /
delete), so that another backend (S3, a database) can replace `LocalDeltaStore` later.

Guarantees of `LocalDeltaStore`:
- a delta is validated completely (`parse_delta`) before anything touches the disk;
- every write is atomic: a temp file in the same folder, fsync, `os.replace`, fsync of the
  folder; the manifest is written the same way, and it is the manifest that makes a new
  version visible, so the old version serves until the new one is fully written;
- uploads to one name are serialised (a lock per name); writers in other processes on the same
  folder too (`flock` on the deltas folder, and the manifest re-read under it), so no update
  is lost; versions only ever increase, also across a delete, so `(name, version)` always means
  the same bytes (a process sees another's uploads when it writes or restarts: several
  replicas that must agree share an `S3DeltaStore`, see adapters_store/s3.py);
- files of replaced or deleted versions, and leftovers of a crash, are removed.

The store knows no torch module: it reads bytes, asks `parse_delta` whether they are valid
against a `BackboneSpec`, and keeps what the manifest needs.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

from adapters_store.format import BackboneSpec, InvalidDelta, TaskDelta, parse_delta

log = logging.getLogger(__name__)

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

    @classmethod
    def from_delta(cls, name: str, version: int, data: bytes, delta: TaskDelta, owner: str | None = None) -> TaskInfo:
        meta = delta.meta
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


class LocalDeltaStore:
    """A folder: `manifest.json` and `deltas/<name>/<version>.safetensors`."""

    def __init__(self, root: str | os.PathLike[str], spec: BackboneSpec,
                 max_delta_bytes: int = DEFAULT_MAX_DELTA_BYTES) -> None:
        self.root = Path(root)
        self.spec = spec
        self.max_delta_bytes = max_delta_bytes
        self._deltas = self.root / "deltas"
        self._manifest_path = self.root / MANIFEST
        self._lock = threading.Lock()  # guards the in-memory manifest and its file
        self._name_locks: dict[str, threading.Lock] = {}
        self.created = not self._manifest_path.exists()
        self._deltas.mkdir(parents=True, exist_ok=True)
        with self._exclusive():
            self._tasks, self._last_versions = self._load_manifest()
            self._remove_strays()

    # ------------------------------------------------------------------ reading

    def list(self) -> list[TaskInfo]:
        with self._lock:
            return sorted(self._tasks.values(), key=lambda info: info.name)

    def get_info(self, name: str) -> TaskInfo | None:
        with self._lock:
            return self._tasks.get(name)

    def read_bytes(self, name: str, version: int | None = None) -> bytes:
        with self._lock:
            info = self._tasks.get(name)
        if info is None or (version is not None and version != info.version):
            raise TaskNotFound(name, version)
        try:
            data = self._path(name, info.version).read_bytes()
        except FileNotFoundError:
            # A replace between our manifest read and the file read removed this version.
            current = self.get_info(name)
            if current is not None and current.version != info.version:
                raise TaskNotFound(name, info.version) from None
            raise StoreCorrupt(f"the file of task {name!r} version {info.version} is missing") from None
        return check_sha256(data, info, "file")

    # ------------------------------------------------------------------ writing

    def put(self, name: str, data: bytes, owner: str | None = None,
            quota: Quota | None = None) -> tuple[TaskInfo, bool]:
        delta = validate_upload(name, data, self.spec, self.max_delta_bytes)  # raises before anything is written
        with self._name_lock(name), self._exclusive():
            with self._lock:
                self._tasks, self._last_versions = self._load_manifest()  # another process may have written
                previous = self._tasks.get(name)
                check_owner(previous, name, owner)
                if owner is not None and quota is not None:
                    quota.check(owner, self._tasks.values(), name, len(data))
                version = self._last_versions.get(name, 0) + 1
            kept_owner = owner if previous is None or owner is not None else previous.owner
            info = TaskInfo.from_delta(name, version, data, delta, kept_owner)
            path = self._path(name, version)
            path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(path, data)
            with self._lock:
                tasks = {**self._tasks, name: info}
                last = {**self._last_versions, name: version}
                try:
                    self._write_manifest(tasks, last)
                except BaseException:
                    path.unlink(missing_ok=True)
                    raise
                self._tasks, self._last_versions = tasks, last
            if previous is not None:
                self._path(name, previous.version).unlink(missing_ok=True)
        log.info("stored task %s version %d (%d bytes)", name, version, len(data))
        return info, previous is None

    def delete(self, name: str, owner: str | None = None) -> TaskInfo:
        with self._name_lock(name), self._exclusive():
            with self._lock:
                self._tasks, self._last_versions = self._load_manifest()
                info = owned_info(self._tasks.get(name), name, owner)
                tasks = {k: v for k, v in self._tasks.items() if k != name}
                self._write_manifest(tasks, self._last_versions)
                self._tasks = tasks
            folder = self._path(name, info.version).parent
            self._path(name, info.version).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                folder.rmdir()
        log.info("deleted task %s", name)
        return info

    # ------------------------------------------------------------------ internals

    def _path(self, name: str, version: int) -> Path:
        return self._deltas / name / f"{version}.safetensors"

    @contextlib.contextmanager
    def _name_lock(self, name: str) -> Iterator[None]:
        with self._lock:
            lock = self._name_locks.setdefault(name, threading.Lock())
        with lock:
            yield

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Excludes writers in other processes: an advisory lock on the deltas folder (no extra file)."""
        fd = os.open(self._deltas, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _load_manifest(self) -> tuple[dict[str, TaskInfo], dict[str, int]]:
        if not self._manifest_path.exists():
            return {}, {}
        raw = json.loads(self._manifest_path.read_text())
        if raw.get("format") != MANIFEST_FORMAT:
            raise StoreCorrupt(f"{self._manifest_path} is not a {MANIFEST_FORMAT} manifest")
        tasks = {}
        for name, entry in raw.get("tasks", {}).items():
            info = TaskInfo.from_dict(entry)
            if not self._path(name, info.version).exists():
                log.error("task %s: file of version %d is missing; dropping it", name, info.version)
                continue
            tasks[name] = info
        last = {name: int(v) for name, v in raw.get("last_versions", {}).items()}
        return tasks, last

    def _write_manifest(self, tasks: dict[str, TaskInfo], last_versions: dict[str, int]) -> None:
        body = {
            "format": MANIFEST_FORMAT,
            "tasks": {name: info.to_dict() for name, info in sorted(tasks.items())},
            "last_versions": dict(sorted(last_versions.items())),
        }
        _atomic_write(self._manifest_path, json.dumps(body, indent=2).encode())

    def _remove_strays(self) -> None:
        """Drop what a crash may have left: temp files and versions no manifest entry names."""
        keep = {self._path(name, info.version) for name, info in self._tasks.items()}
        for path in list(self.root.glob(".*.tmp")) + list(self._deltas.glob("*/*")):
            if path not in keep and path.is_file():
                log.info("removing stray file %s", path)
                path.unlink(missing_ok=True)
        for folder in self._deltas.iterdir():
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()


def _atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; some platforms cannot open a folder.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def open_store(location: str | os.PathLike[str], spec: BackboneSpec, *,
               max_delta_bytes: int = DEFAULT_MAX_DELTA_BYTES, **s3_options: object) -> DeltaStore:
    """The store at `location`: `s3://bucket/prefix` → `S3DeltaStore` (options passed on), else a folder."""
    if str(location).startswith("s3://"):
        from adapters_store.s3 import S3DeltaStore  # boto3 only when an S3 store is asked for

        return S3DeltaStore(str(location), spec, max_delta_bytes=max_delta_bytes, **s3_options)  # type: ignore[arg-type]
    return LocalDeltaStore(location, spec, max_delta_bytes=max_delta_bytes)
