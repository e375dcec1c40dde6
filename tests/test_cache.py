"""The device cache: byte budget, LRU order, pins, single-flight loading."""

from __future__ import annotations

import threading
import time

import pytest

from server.cache import DeltaCache
from server.delta import prepare
from tests.factories import make_delta


@pytest.fixture
def deltas(tiny_backbone):
    return {i: prepare(make_delta(tiny_backbone, ("low_rank",), seed=i), tiny_backbone, f"t{i}", 1)
            for i in range(5)}


def test_lru_eviction_under_budget(deltas):
    size = deltas[0].nbytes
    cache = DeltaCache(budget_bytes=size * 3)
    for i in range(3):
        cache.get(i, lambda i=i: deltas[i])
    cache.get(0, lambda: deltas[0])  # 0 becomes most recent; 1 is now the oldest
    cache.get(3, lambda: deltas[3])
    assert 1 not in cache and 0 in cache and 2 in cache and 3 in cache
    stats = cache.stats()
    assert stats["evictions"] == 1 and stats["hits"] == 1 and stats["misses"] == 4
    assert stats["resident_bytes"] <= cache.budget_bytes


def test_pinned_entries_survive_until_unpinned(deltas):
    size = deltas[0].nbytes
    cache = DeltaCache(budget_bytes=size)
    cache.get(0, lambda: deltas[0])
    with cache.pinned([0]):
        cache.get(1, lambda: deltas[1])  # over budget: 1 can go, 0 cannot
        assert 0 in cache
        with cache.pinned([1]):
            cache.get(2, lambda: deltas[2])
            assert 0 in cache and 1 in cache
            assert 2 in cache  # just loaded: kept although over budget
        # unpinning 1 (0 still pinned) evicts 1, then 2, oldest first, until within budget
        assert 0 in cache and 1 not in cache and 2 not in cache
    assert cache.stats()["resident_bytes"] <= cache.budget_bytes
    assert cache.stats()["evictions"] == 2


def test_concurrent_misses_load_once(deltas):
    cache = DeltaCache(budget_bytes=10**9)
    calls = []

    def slow_load():
        calls.append(1)
        time.sleep(0.05)
        return deltas[0]

    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get("k", slow_load))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and all(r is deltas[0] for r in results)


def test_failed_load_is_not_cached(deltas):
    cache = DeltaCache(budget_bytes=10**9)
    with pytest.raises(ValueError):
        cache.get("k", lambda: (_ for _ in ()).throw(ValueError("broken")))
    assert cache.get("k", lambda: deltas[1]) is deltas[1]


def test_discard_task_drops_every_version(deltas):
    cache = DeltaCache(budget_bytes=10**9)
    cache.get(("a", 1), lambda: deltas[0])
    cache.get(("a", 2), lambda: deltas[1])
    cache.get(("b", 1), lambda: deltas[2])
    cache.discard_task("a")
    assert ("a", 1) not in cache and ("a", 2) not in cache and ("b", 1) in cache
