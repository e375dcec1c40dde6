"""The store in a folder: task deltas on disk, one file per task version plus a JSON manifest.

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

What every store shares (the protocol, `TaskInfo`, the checks before a write) is in adapters_store/store.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from adapters_store.format import BackboneSpec
from adapters_store.store import (
    DEFAULT_MAX_DELTA_BYTES,
    MANIFEST,
    MANIFEST_FORMAT,
    Quota,
    StoreCorrupt,
    TaskInfo,
    TaskNotFound,
    check_owner,
    check_sha256,
    owned_info,
    validate_upload,
)

log = logging.getLogger(__name__)


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
            info = TaskInfo.from_delta(name, version, data, delta, kept_owner, hidden_size=self.spec.hidden_size)
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

    def on_change(self, listener: Callable[[set[str]], None]) -> None:
        """Never called: a folder's other writers are seen on the next write or restart (see above)."""

    def close(self) -> None:
        """Nothing runs in the background."""

    def problem(self) -> str | None:
        """The folder gone or not writable (a volume unmounted, a bind mount of another owner)."""
        if not self.root.is_dir():
            return f"the store folder {str(self.root)!r} is gone"
        if not os.access(self.root, os.W_OK | os.X_OK):
            return f"the store folder {str(self.root)!r} is not writable by this user (uid {os.getuid()})"
        return None

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
