"""The adapter store in an S3 bucket, shared by several server replicas (`--store s3://bucket/prefix`).

Layout under the prefix: `manifest.json` (the same manifest as the folder store's, plus the
object key of each version and a `serial` that counts commits) and one immutable object per
uploaded version, `deltas/<name>/<random>.safetensors`.

The folder store's guarantees, in object-store terms:
- an upload is validated completely (`parse_delta`) before anything is written;
- a version object is written once, with `If-None-Match: *`, and never changed;
- a version becomes visible by ONE conditional write of the manifest: `If-Match: <etag read>`
  (or `If-None-Match: *` for the first manifest). When another writer (a thread, or another
  replica) committed in between, S3 answers 412 (or 409 for a write racing another) and the
  change is re-applied to the fresh manifest, so no update is lost and version numbers
  (`last_versions + 1`, read under that condition) are never reused;
- an upload killed before its commit leaves the old manifest, so the old version serves;
  its object is an orphan no manifest names, deleted by `collect_garbage` once older than
  `orphan_grace_s` (an upload in flight in another replica is younger than that: a commit gives
  up after `commit_timeout_s`, well below the grace). Replaced and deleted versions' objects
  are deleted right after the commit;
- the sha256 of the manifest entry is checked on every read.

Replicas agree: each one keeps the manifest in memory (so `get_info` costs no request) and a
watcher thread polls it every `poll_interval_s` with `If-None-Match: <etag>`, a 304 without a
body when nothing changed; a change is installed whole, so a request that resolved a version
keeps it. A replica whose view is older than a replace may read a version object that was just
deleted: `read_bytes` then refreshes the manifest and reports the version gone, and the batcher
takes the newer one.

SeaweedFS (4.48) honours `If-None-Match: *` and `If-Match` on PutObject, and the conditional
writes are atomic (two processes × 8 threads doing read-modify-write on one object lost no
update); see docs/cluster.md.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlparse

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from adapters_store.format import BackboneSpec
from adapters_store.store import (
    DEFAULT_MAX_DELTA_BYTES,
    MANIFEST,
    MANIFEST_FORMAT,
    Quota,
    StoreCorrupt,
    StoreUnavailable,
    TaskInfo,
    TaskNotFound,
    check_owner,
    check_sha256,
    owned_info,
    validate_upload,
)

log = logging.getLogger(__name__)

CONFLICT_STATUSES = (409, 412)  # 412: the condition failed; 409: AWS's answer to two racing conditional writes


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` → ("bucket", "some/prefix/"); the prefix may be empty."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"{url!r} is not an s3://bucket[/prefix] URL")
    prefix = parsed.path.strip("/")
    return parsed.netloc, f"{prefix}/" if prefix else ""


def s3_client(endpoint_url: str | None = None, max_attempts: int = 4) -> Any:
    """A boto3 S3 client: endpoint from the argument, else AWS_ENDPOINT_URL; credentials as boto3 finds them."""
    config = Config(retries={"mode": "standard", "max_attempts": max_attempts}, max_pool_connections=32,
                    connect_timeout=5, read_timeout=30,
                    # path-style (http://host/bucket/key): what MinIO and SeaweedFS expect by default
                    s3={"addressing_style": "path"})
    return boto3.client("s3", endpoint_url=endpoint_url or None, config=config)


@dataclass
class _Manifest:
    tasks: dict[str, TaskInfo] = field(default_factory=dict)
    objects: dict[str, str] = field(default_factory=dict)  # task name → key of its current version's object
    last_versions: dict[str, int] = field(default_factory=dict)
    serial: int = 0

    def encode(self) -> bytes:
        return json.dumps({
            "format": MANIFEST_FORMAT,
            "serial": self.serial,
            "tasks": {name: {**info.to_dict(), "object": self.objects[name]}
                      for name, info in sorted(self.tasks.items())},
            "last_versions": dict(sorted(self.last_versions.items())),
        }, indent=2).encode()

    @classmethod
    def decode(cls, body: bytes, where: str) -> _Manifest:
        try:
            raw = json.loads(body)
        except ValueError as err:
            raise StoreCorrupt(f"{where} is not JSON: {err}") from None
        if not isinstance(raw, dict) or raw.get("format") != MANIFEST_FORMAT:
            raise StoreCorrupt(f"{where} is not a {MANIFEST_FORMAT} manifest")
        tasks, objects = {}, {}
        for name, entry in raw.get("tasks", {}).items():
            tasks[name] = TaskInfo.from_dict(entry)
            objects[name] = entry["object"]
        last = {name: int(v) for name, v in raw.get("last_versions", {}).items()}
        return cls(tasks, objects, last, int(raw.get("serial", 0)))


class S3DeltaStore:
    """A `DeltaStore` in `s3://bucket/prefix`; safe to share between threads, processes and machines."""

    def __init__(self, url: str, spec: BackboneSpec, *, max_delta_bytes: int = DEFAULT_MAX_DELTA_BYTES,
                 endpoint_url: str | None = None, poll_interval_s: float = 1.0, orphan_grace_s: float = 600.0,
                 commit_timeout_s: float = 60.0, gc_interval_s: float = 300.0, client: Any = None,
                 watch: bool = True) -> None:
        self.url = url
        self.bucket, self.prefix = parse_s3_url(url)
        self.spec = spec
        self.max_delta_bytes = max_delta_bytes
        self.poll_interval_s = poll_interval_s
        self.orphan_grace_s = orphan_grace_s
        self.commit_timeout_s = commit_timeout_s
        self.gc_interval_s = gc_interval_s
        self.client = client or s3_client(endpoint_url)
        self._manifest_key = f"{self.prefix}{MANIFEST}"
        self._lock = threading.Lock()  # guards the view below; S3 requests happen outside it
        self._view = _Manifest()
        self._etag: str | None = None
        self._listeners: list[Callable[[set[str]], None]] = []
        self._stop = threading.Event()
        self._ensure_bucket()
        self.created = self._create_manifest()
        self.refresh()
        self.collect_garbage()
        self._watcher: threading.Thread | None = None
        self._last_error: str | None = None  # the watcher's last refresh failed: readiness reports it
        if watch and poll_interval_s > 0:
            self._watcher = threading.Thread(target=self._watch, name="deltaserve-s3-watch", daemon=True)
            self._watcher.start()

    # ------------------------------------------------------------------ reading (from the view)

    def list(self) -> list[TaskInfo]:
        with self._lock:
            return sorted(self._view.tasks.values(), key=lambda info: info.name)

    def get_info(self, name: str) -> TaskInfo | None:
        with self._lock:
            return self._view.tasks.get(name)

    def read_bytes(self, name: str, version: int | None = None) -> bytes:
        with self._lock:
            info, key = self._view.tasks.get(name), self._view.objects.get(name)
        if info is None or key is None or (version is not None and version != info.version):
            raise TaskNotFound(name, version)
        try:
            data = self._call(self.client.get_object, Bucket=self.bucket, Key=key)["Body"].read()
        except ClientError as err:
            if _status(err) != 404:
                raise StoreUnavailable(f"reading {key}: {err}") from None
            # Replaced by another replica since our view was taken: catch up, and say this version is gone.
            self.refresh()
            current = self.get_info(name)
            if current is None or current.version != info.version:
                raise TaskNotFound(name, info.version) from None
            raise StoreCorrupt(f"the object of task {name!r} version {info.version} ({key}) is missing") from None
        return check_sha256(data, info, "object")

    # ------------------------------------------------------------------ writing

    def put(self, name: str, data: bytes, owner: str | None = None,
            quota: Quota | None = None) -> tuple[TaskInfo, bool]:
        delta = validate_upload(name, data, self.spec, self.max_delta_bytes)  # raises before anything is written
        key = f"{self.prefix}deltas/{name}/{uuid.uuid4().hex}.safetensors"
        self._put_object(key, data, IfNoneMatch="*")  # a fresh key: never overwrites anything
        result: dict[str, Any] = {}

        def change(manifest: _Manifest) -> None:  # on the manifest as read for the conditional write
            previous = manifest.tasks.get(name)
            check_owner(previous, name, owner)
            if owner is not None and quota is not None:
                quota.check(owner, manifest.tasks.values(), name, len(data))
            version = manifest.last_versions.get(name, 0) + 1
            kept_owner = owner if previous is None or owner is not None else previous.owner
            info = TaskInfo.from_delta(name, version, data, delta, kept_owner, hidden_size=self.spec.hidden_size)
            result.update(info=info, previous=manifest.objects.get(name), created=name not in manifest.tasks)
            manifest.tasks[name] = info
            manifest.objects[name] = key
            manifest.last_versions[name] = version

        try:
            self._commit(change)
        except BaseException:
            self._delete_objects([key])  # best effort; what is left is an orphan for collect_garbage
            raise
        if result["previous"]:
            self._delete_objects([result["previous"]])
        info = result["info"]
        log.info("stored task %s version %d (%d bytes) in %s", name, info.version, len(data), self.url)
        return info, result["created"]

    def delete(self, name: str, owner: str | None = None) -> TaskInfo:
        result: dict[str, Any] = {}

        def change(manifest: _Manifest) -> None:
            owned_info(manifest.tasks.get(name), name, owner)
            result.update(info=manifest.tasks.pop(name), key=manifest.objects.pop(name))

        self._commit(change)
        self._delete_objects([result["key"]])
        log.info("deleted task %s from %s", name, self.url)
        return result["info"]

    # ------------------------------------------------------------------ keeping replicas in step

    def on_change(self, listener: Callable[[set[str]], None]) -> None:
        """Call `listener(names)` whenever a refresh finds tasks replaced or deleted (e.g. to drop cache entries)."""
        self._listeners.append(listener)

    def refresh(self) -> bool:
        """Fetch the manifest if it changed (a 304 without a body when not); True when the view changed."""
        with self._lock:
            etag = self._etag
        try:
            extra = {"IfNoneMatch": etag} if etag else {}
            response = self._call(self.client.get_object, Bucket=self.bucket, Key=self._manifest_key, **extra)
        except ClientError as err:
            if _status(err) == 304:
                return False
            if _status(err) == 404:
                return self._install(_Manifest(serial=-1), None)
            raise StoreUnavailable(f"reading {self._manifest_key}: {err}") from None
        manifest = _Manifest.decode(response["Body"].read(), f"s3://{self.bucket}/{self._manifest_key}")
        return self._install(manifest, response["ETag"])

    def collect_garbage(self, grace_s: float | None = None) -> list[str]:
        """Delete version objects no manifest names and older than `grace_s`; returns their keys."""
        grace = self.orphan_grace_s if grace_s is None else grace_s
        manifest, _ = self._fetch()
        named = set(manifest.objects.values())
        cutoff = datetime.now(timezone.utc) - timedelta(seconds=grace)
        orphans = []
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=f"{self.prefix}deltas/"):
                for obj in page.get("Contents", []):
                    if obj["Key"] not in named and obj["LastModified"] <= cutoff:
                        orphans.append(obj["Key"])
        except (BotoCoreError, ClientError) as err:
            raise StoreUnavailable(f"listing {self.url}: {err}") from None
        if orphans:
            log.info("removing %d orphaned version objects from %s", len(orphans), self.url)
            self._delete_objects(orphans)
        return orphans

    def object_keys(self) -> list[str]:
        """Every object under the prefix (for tests and operators)."""
        paginator = self.client.get_paginator("list_objects_v2")
        return sorted(obj["Key"] for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix)
                      for obj in page.get("Contents", []))

    def problem(self) -> str | None:
        """The last check of the manifest failed: the bucket cannot be reached (cleared by the next success)."""
        return self._last_error

    def close(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)

    # ------------------------------------------------------------------ internals

    def _watch(self) -> None:
        next_gc = time.monotonic() + self.gc_interval_s
        while not self._stop.wait(self.poll_interval_s):
            try:
                self.refresh()
                self._last_error = None
                if time.monotonic() >= next_gc:
                    next_gc = time.monotonic() + self.gc_interval_s
                    self.collect_garbage()
            except Exception as err:  # the store may be down for a while: keep serving the last view
                self._last_error = f"the S3 store {self.url} cannot be reached: {err}"
                log.warning("refreshing the manifest of %s failed: %s", self.url, err)

    def _install(self, manifest: _Manifest, etag: str | None) -> bool:
        """Take `manifest` as the view unless the view is already as new (a racing fetch may be older)."""
        with self._lock:
            old = self._view
            if etag == self._etag or (manifest.serial <= old.serial and etag is not None and self._etag is not None):
                return False
            self._view, self._etag = manifest, etag
        changed = {name for name, info in old.tasks.items()
                   if name not in manifest.tasks or manifest.tasks[name].version != info.version}
        if changed:
            for listener in self._listeners:
                try:
                    listener(changed)
                except Exception:
                    log.exception("store listener failed")
        return True

    def _fetch(self) -> tuple[_Manifest, str | None]:
        """The manifest as it is in the bucket now, with its ETag (None when there is none)."""
        try:
            response = self._call(self.client.get_object, Bucket=self.bucket, Key=self._manifest_key)
        except ClientError as err:
            if _status(err) == 404:
                return _Manifest(), None
            raise StoreUnavailable(f"reading {self._manifest_key}: {err}") from None
        return _Manifest.decode(response["Body"].read(), f"s3://{self.bucket}/{self._manifest_key}"), response["ETag"]

    def _commit(self, change: Callable[[_Manifest], None]) -> None:
        """Apply `change` to the current manifest and write it back on condition; again on a conflict."""
        deadline = time.monotonic() + self.commit_timeout_s
        attempt = 0
        while True:
            manifest, etag = self._fetch()
            change(manifest)  # may raise (TaskNotFound): nothing written
            manifest.serial += 1
            condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
            try:
                response = self._put_object(self._manifest_key, manifest.encode(), **condition)
            except _Conflict:
                attempt += 1
                if time.monotonic() > deadline:
                    raise StoreUnavailable(f"the manifest of {self.url} kept changing for "
                                           f"{self.commit_timeout_s:.0f} s; nothing was committed") from None
                time.sleep(random.uniform(0, min(0.5, 0.01 * 2 ** attempt)))  # jitter: racing writers spread out
                continue
            self._install(manifest, response["ETag"])
            return

    def _put_object(self, key: str, body: bytes, **condition: str) -> dict[str, Any]:
        try:
            return self._call(self.client.put_object, Bucket=self.bucket, Key=key, Body=body, **condition)
        except ClientError as err:
            if _status(err) in CONFLICT_STATUSES:
                raise _Conflict() from None
            raise StoreUnavailable(f"writing {key}: {err}") from None

    def _delete_objects(self, keys: list[str]) -> None:
        for key in keys:
            try:
                self._call(self.client.delete_object, Bucket=self.bucket, Key=key)
            except (ClientError, StoreUnavailable) as err:  # left for collect_garbage
                log.warning("could not delete %s: %s", key, err)

    def _create_manifest(self) -> bool:
        """Write an empty manifest if there is none; True only for the one caller that created it."""
        try:
            self._put_object(self._manifest_key, _Manifest().encode(), IfNoneMatch="*")
        except _Conflict:
            return False
        return True

    def _ensure_bucket(self) -> None:
        try:
            self._call(self.client.head_bucket, Bucket=self.bucket)
        except ClientError as err:
            if _status(err) != 404:
                raise StoreUnavailable(f"bucket {self.bucket}: {err}") from None
            try:
                self._call(self.client.create_bucket, Bucket=self.bucket)
            except ClientError as create_err:  # another replica created it first
                if _status(create_err) != 409:
                    raise StoreUnavailable(f"creating bucket {self.bucket}: {create_err}") from None

    @staticmethod
    def _call(method: Callable[..., dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
        try:
            return method(**kwargs)
        except BotoCoreError as err:  # connection refused, timeouts, no credentials
            raise StoreUnavailable(f"the S3 request failed: {err}") from None


class _Conflict(Exception):
    """A conditional write lost to another writer."""


def _status(err: ClientError) -> int:
    meta = err.response.get("ResponseMetadata", {})
    code = err.response.get("Error", {}).get("Code", "")
    return int(meta.get("HTTPStatusCode") or (code if code.isdigit() else 0))
