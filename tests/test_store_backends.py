"""The store's guarantees on both backends: a folder, and S3 (a real SeaweedFS server).

Atomic replace, versions that only increase, validation before any write, two writer processes
at once (no lost update, no version reused), kill -9 in the middle of an upload (the old version
serves, nothing half visible, the orphan collected), and a changed object detected on read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from delta_builders import build_delta

from adapters_store import LocalDeltaStore, open_store
from adapters_store.format import BackboneMismatch, InvalidDelta
from adapters_store.store import (
    NameTaken,
    Quota,
    QuotaExceeded,
    StoreCorrupt,
    TaskNotFound,
)

TESTS = Path(__file__).resolve().parent
BUCKET = "deltaserve-tests"


@dataclass
class Backend:
    kind: str
    location: str
    open: Callable[..., object]  # a new store on `location` (a restart, or another replica)
    raw: Callable[[], list[str]]  # every file / object the store holds, manifest included
    overwrite: Callable[[str, bytes], None]  # replace the stored bytes of a task's current version


@pytest.fixture(params=["folder", "s3"])
def backend(request, tmp_path, tiny_backbone) -> Backend:
    spec = tiny_backbone.spec()
    if request.param == "folder":
        root = tmp_path / "store"

        def raw() -> list[str]:
            return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

        def overwrite(name: str, data: bytes) -> None:
            info = LocalDeltaStore(root, spec).get_info(name)
            (root / "deltas" / name / f"{info.version}.safetensors").write_bytes(data)

        return Backend("folder", str(root), lambda **kw: LocalDeltaStore(root, spec, **kw), raw, overwrite)

    request.getfixturevalue("s3_endpoint")
    url = f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"

    def open_s3(**kw: object):
        store = open_store(url, spec, **{"poll_interval_s": 0, **kw})
        request.addfinalizer(store.close)
        return store

    def raw_s3() -> list[str]:
        return [key.split("/", 1)[1] for key in open_s3().object_keys()]

    def overwrite_s3(name: str, data: bytes) -> None:
        store = open_s3()
        key = store._view.objects[name]
        store.client.put_object(Bucket=store.bucket, Key=key, Body=data)

    return Backend("s3", url, open_s3, raw_s3, overwrite_s3)


def version_objects(backend: Backend) -> list[str]:
    return [key for key in backend.raw() if key.startswith("deltas/")]


def test_atomic_replace_and_versions(backend, tiny_backbone):
    store = backend.open()
    assert store.created and store.list() == []
    v1 = build_delta(tiny_backbone, parts=("lora", "keep"), seed=1)
    v2 = build_delta(tiny_backbone, parts=("sparse",), seed=2)
    info, created = store.put("sst2", v1)
    assert created and info.version == 1 and store.read_bytes("sst2") == v1
    info, created = store.put("sst2", v2)
    assert not created and info.version == 2 and store.read_bytes("sst2", 2) == v2
    with pytest.raises(TaskNotFound):
        store.read_bytes("sst2", 1)
    assert len(version_objects(backend)) == 1  # the replaced version's bytes are gone

    again = backend.open()  # a restart (or another replica) sees the same thing
    assert not again.created
    assert [(t.name, t.version, t.sha256) for t in again.list()] == [("sst2", 2, info.sha256)]
    assert store.delete("sst2").version == 2 and version_objects(backend) == []
    info, created = store.put("sst2", v1)
    assert created and info.version == 3  # never reused, also across a delete


@pytest.mark.parametrize("make, error", [
    (lambda bb: b"not a delta at all", InvalidDelta),
    (lambda bb: build_delta(bb, metadata={"labels": '["a", "b", "c"]'}), InvalidDelta),
])
def test_invalid_upload_writes_nothing(backend, tiny_backbone, make, error):
    store = backend.open()
    store.put("keep-me", build_delta(tiny_backbone))
    before = backend.raw()
    with pytest.raises(error):
        store.put("keep-me", make(tiny_backbone))
    with pytest.raises(error):
        store.put("new-one", make(tiny_backbone))
    assert backend.raw() == before and store.get_info("keep-me").version == 1
    assert [t.name for t in backend.open().list()] == ["keep-me"]


def test_mismatched_backbone_writes_nothing(backend, tiny_backbone, tokenizer):
    from conftest import make_tiny_backbone

    store = backend.open()
    with pytest.raises(BackboneMismatch):
        store.put("t", build_delta(make_tiny_backbone(tokenizer, seed=5)))
    assert version_objects(backend) == [] and store.list() == []


def _worker(backend: Backend, spec_file: Path, mode: str, name: str, files: list[Path]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, str(TESTS / "store_worker.py"), backend.location, str(spec_file), mode,
                             name, *map(str, files)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


@pytest.fixture
def spec_file(tmp_path, tiny_backbone) -> Path:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(dataclasses.asdict(tiny_backbone.spec())))
    return path


def test_two_writer_processes_lose_nothing(backend, tiny_backbone, tmp_path, spec_file):
    backend.open()  # the store exists before the writers race
    per_process = 4
    files = {who: [tmp_path / f"{who}{i}.safetensors" for i in range(per_process)] for who in "ab"}
    payloads = {}
    for who, paths in files.items():
        for i, path in enumerate(paths):
            payloads[path] = build_delta(tiny_backbone, seed=10 * (who == "b") + i)
            path.write_bytes(payloads[path])
    workers = {who: _worker(backend, spec_file, "put", "shared", paths) for who, paths in files.items()}
    versions = {}
    for who, process in workers.items():
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        versions[who] = [json.loads(line)["version"] for line in out.splitlines()]
    # Each writer saw its own versions increase; together they are 1..8, none reused, none lost.
    for who in "ab":
        assert versions[who] == sorted(versions[who]) and len(versions[who]) == per_process
    assert sorted(versions["a"] + versions["b"]) == list(range(1, 2 * per_process + 1))
    final = backend.open()
    assert final.get_info("shared").version == 2 * per_process
    assert final.read_bytes("shared") in payloads.values()
    assert len(version_objects(backend)) == 1


def test_kill_during_upload_keeps_the_old_version(backend, tiny_backbone, tmp_path, spec_file):
    store = backend.open()
    old = build_delta(tiny_backbone, seed=1)
    store.put("t", old)
    new_file = tmp_path / "new.safetensors"
    new_file.write_bytes(build_delta(tiny_backbone, parts=("lora", "sparse", "keep"), seed=2))
    worker = _worker(backend, spec_file, "hang", "t", [new_file])
    assert worker.stdout.readline().strip() == "uploaded", worker.stderr.read()
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait(10)
    assert len(version_objects(backend)) == 2  # the new version's bytes were written, then the writer died
    # Nothing of it is visible: the live store and a restarted one serve the old version.
    assert store.get_info("t").version == 1 and store.read_bytes("t") == old
    options = {"orphan_grace_s": 0} if backend.kind == "s3" else {}
    restarted = backend.open(**options)
    assert [(t.name, t.version) for t in restarted.list()] == [("t", 1)] and restarted.read_bytes("t") == old
    assert len(version_objects(backend)) == 1  # the orphan was collected
    info, _ = restarted.put("t", new_file.read_bytes())
    assert info.version == 2  # the killed upload did not take a version number


def test_changed_object_is_detected(backend, tiny_backbone):
    store = backend.open()
    data = build_delta(tiny_backbone)
    store.put("t", data)
    backend.overwrite("t", data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(StoreCorrupt, match="sha256"):
        backend.open().read_bytes("t")


def test_s3_replicas_follow_the_manifest(s3_endpoint, tiny_backbone):
    """A second S3 store (another replica) sees uploads and deletes by polling; a stale one catches up on read."""
    spec = tiny_backbone.spec()
    url = f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"
    writer = open_store(url, spec, poll_interval_s=0)
    follower = open_store(url, spec, poll_interval_s=0.1)
    stale = open_store(url, spec, poll_interval_s=0)
    changed: list[set[str]] = []
    follower.on_change(changed.append)
    try:
        v1, v2 = build_delta(tiny_backbone, seed=1), build_delta(tiny_backbone, seed=2)
        def follower_at(version: int | None) -> None:
            deadline = time.monotonic() + 10
            while getattr(follower.get_info("t"), "version", None) != version and time.monotonic() < deadline:
                time.sleep(0.02)
            assert getattr(follower.get_info("t"), "version", None) == version

        writer.put("t", v1)
        stale.refresh()
        assert stale.get_info("t").version == 1
        follower_at(1)
        writer.put("t", v2)
        follower_at(2)
        assert follower.read_bytes("t") == v2
        assert {"t"} in changed  # version 1 replaced: a cache can drop it
        # The stale view still names version 1, whose object is deleted: the read says so and catches up.
        with pytest.raises(TaskNotFound):
            stale.read_bytes("t", 1)
        assert stale.get_info("t").version == 2
        writer.delete("t")
        follower_at(None)
    finally:
        for store in (writer, follower, stale):
            store.close()


def test_unreachable_s3_is_a_clear_503(tiny_backbone, monkeypatch):
    from http_helpers import free_port

    from adapters_store.s3 import s3_client
    from adapters_store.store import StoreUnavailable
    from bench.seaweedfs import CREDENTIALS
    from server.api.errors import status_of

    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)  # else boto3 looks for credentials on an EC2 metadata service first
    # Nothing listens there; one attempt, so that it fails at once (the retries are boto3's, not ours).
    client = s3_client(f"http://127.0.0.1:{free_port()}", max_attempts=1)
    with pytest.raises(StoreUnavailable, match="the S3 request failed"):
        open_store("s3://nowhere/store", tiny_backbone.spec(), client=client)
    assert status_of(StoreUnavailable("the S3 request failed")) == (503, {"Retry-After": "5"})


def test_ownership_and_quotas_live_in_the_manifest(backend, tiny_backbone):
    """A tenant's task is recorded as its own in the manifest, so every replica (and a restart) enforces the
    same: another tenant's write is NameTaken and its delete absent, the operator's replace keeps the owner,
    and a quota refuses before anything is written."""
    store = backend.open()
    first = build_delta(tiny_backbone, seed=1)
    info, _ = store.put("acme-task", first, "acme")
    assert info.owner == "acme"
    replica = backend.open()
    assert replica.get_info("acme-task").owner == "acme"
    before = backend.raw()
    with pytest.raises(NameTaken):
        replica.put("acme-task", build_delta(tiny_backbone, seed=2), "beta")
    with pytest.raises(TaskNotFound):
        replica.delete("acme-task", "beta")
    assert backend.raw() == before
    assert replica.put("acme-task", build_delta(tiny_backbone, seed=3))[0].owner == "acme"  # the operator
    with pytest.raises(QuotaExceeded, match="max_tasks"):
        store.put("second", first, "acme", Quota(max_tasks=1))
    with pytest.raises(QuotaExceeded, match="max_delta_bytes"):
        store.put("acme-task", first, "acme", Quota(max_delta_bytes=len(first) - 1))
    assert [(t.name, t.owner, t.version) for t in backend.open().list()] == [("acme-task", "acme", 2)]
    assert store.delete("acme-task", "acme").owner == "acme"
