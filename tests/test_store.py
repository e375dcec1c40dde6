"""The on-disk adapter store: validation before writing, atomic replace, restart, locking."""

from __future__ import annotations

import json
import threading

import pytest
from conftest import make_tiny_backbone
from delta_builders import build_delta

from adapters_store.format import BackboneMismatch, InvalidDelta
from adapters_store.local import LocalDeltaStore
from adapters_store.store import (
    DeltaTooLarge,
    InvalidTaskName,
    StoreCorrupt,
    TaskNotFound,
)


@pytest.fixture
def store(tmp_path, tiny_backbone) -> LocalDeltaStore:
    return LocalDeltaStore(tmp_path / "store", tiny_backbone.spec(), max_delta_bytes=2_000_000)


def files(store: LocalDeltaStore) -> list[str]:
    return sorted(str(p.relative_to(store.root)) for p in store.root.rglob("*") if p.is_file())


def test_put_list_read_and_replace(store, tiny_backbone):
    assert store.created and store.list() == []
    first = build_delta(tiny_backbone, parts=("lora", "keep"), description="v1")
    info, created = store.put("sst2", first)
    assert created and info.version == 1 and info.delta_bytes == len(first)
    assert info.method == "dsee" and info.labels == ["negative", "positive"] and info.description == "v1"
    assert info.head_bytes == (2 * 32 + 2) * 4 and info.bytes_by_part["KeepMask"] > 0
    assert store.read_bytes("sst2") == first == store.read_bytes("sst2", 1)

    second = build_delta(tiny_backbone, parts=("sparse",), seed=1)
    info2, created = store.put("sst2", second)
    assert not created and info2.version == 2 and info2.sha256 != info.sha256
    assert store.read_bytes("sst2") == second
    with pytest.raises(TaskNotFound):
        store.read_bytes("sst2", 1)
    # The old version's file is gone; only the manifest and the current file remain.
    assert files(store) == ["deltas/sst2/2.safetensors", "manifest.json"]
    assert [t.name for t in store.list()] == ["sst2"]


def test_restart_serves_the_same_tasks_and_drops_leftovers(tmp_path, tiny_backbone):
    spec = tiny_backbone.spec()
    store = LocalDeltaStore(tmp_path, spec)
    store.put("a", build_delta(tiny_backbone))
    store.put("b.ner", build_delta(tiny_backbone, task_type="token-classification", labels=["O", "B-X"]))
    # What a crash in the middle of a put would leave behind.
    (tmp_path / "deltas" / "a" / "7.safetensors").write_bytes(b"half")
    (tmp_path / ".manifest.json.123.tmp").write_bytes(b"{")

    again = LocalDeltaStore(tmp_path, spec)
    assert not again.created
    assert [(t.name, t.version, t.task_type) for t in again.list()] == [
        ("a", 1, "sequence-classification"), ("b.ner", 1, "token-classification")]
    assert again.read_bytes("a") == store.read_bytes("a")
    assert files(again) == ["deltas/a/1.safetensors", "deltas/b.ner/1.safetensors", "manifest.json"]


def test_versions_keep_increasing_across_delete(store, tiny_backbone):
    data = build_delta(tiny_backbone)
    store.put("t", data)
    store.put("t", data)
    assert store.delete("t").version == 2
    assert store.get_info("t") is None and files(store) == ["manifest.json"]
    with pytest.raises(TaskNotFound):
        store.delete("t")
    info, created = store.put("t", data)
    assert created and info.version == 3


@pytest.mark.parametrize("make, error", [
    (lambda bb: b"not a delta at all", InvalidDelta),
    (lambda bb: build_delta(bb, metadata={"labels": '["a", "b", "c"]'}), InvalidDelta),
    (lambda bb: build_delta(make_tiny_backbone(bb.tokenizer, seed=5)), BackboneMismatch),
])
def test_invalid_delta_stores_nothing(store, tiny_backbone, make, error):
    store.put("keep-me", build_delta(tiny_backbone))
    before = files(store), (store.root / "manifest.json").read_bytes()
    with pytest.raises(error):
        store.put("keep-me", make(tiny_backbone))
    with pytest.raises(error):
        store.put("new-one", make(tiny_backbone))
    assert (files(store), (store.root / "manifest.json").read_bytes()) == before
    assert store.get_info("keep-me").version == 1


def test_name_and_size_limits(store, tiny_backbone):
    data = build_delta(tiny_backbone)
    for bad in ("", "-x", "a/b", "..", "x" * 65, "sp ace", "é", "ok\n"):
        with pytest.raises(InvalidTaskName):
            store.put(bad, data)
    small = LocalDeltaStore(store.root, store.spec, max_delta_bytes=len(data) - 1)
    with pytest.raises(DeltaTooLarge):
        small.put("big", data)
    assert store.list() == []


def test_failed_manifest_write_leaves_old_version_serving(store, tiny_backbone, monkeypatch):
    old = build_delta(tiny_backbone, seed=1)
    store.put("t", old)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(store, "_write_manifest", broken)
    with pytest.raises(OSError):
        store.put("t", build_delta(tiny_backbone, seed=2))
    assert store.get_info("t").version == 1 and store.read_bytes("t") == old
    assert files(store) == ["deltas/t/1.safetensors", "manifest.json"]


def test_concurrent_uploads_to_one_name_are_serialised(store, tiny_backbone):
    payloads = [build_delta(tiny_backbone, seed=i) for i in range(6)]
    versions: list[int] = []
    threads = [threading.Thread(target=lambda p=p: versions.append(store.put("t", p)[0].version)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(versions) == [1, 2, 3, 4, 5, 6]
    final = store.get_info("t")
    assert final.version == 6 and store.read_bytes("t") in payloads
    assert files(store) == ["deltas/t/6.safetensors", "manifest.json"]
    manifest = json.loads((store.root / "manifest.json").read_text())
    assert manifest["tasks"]["t"]["version"] == 6


def test_changed_file_is_detected(store, tiny_backbone):
    store.put("t", build_delta(tiny_backbone))
    path = store.root / "deltas" / "t" / "1.safetensors"
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    with pytest.raises(StoreCorrupt):
        store.read_bytes("t")
