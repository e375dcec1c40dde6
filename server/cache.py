"""Device cache of prepared deltas: a byte budget, least recently used evicted first.

Keys are `(task name, version)`, so a replaced task never serves a stale entry. A batch pins the
deltas it uses (pin first, then `get`, so that a fresh load is protected too); a pinned entry,
or the one just loaded, is never evicted, even when that leaves the cache over budget for
the length of the batch (the budget is restored on unpin). Loading (`load()` on a miss) happens
outside the cache lock, so one slow load does not stall hits for other tasks; two callers that
miss on the same key at once load it once.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from server.delta import PreparedDelta


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    load_seconds_total: float = 0.0


class DeltaCache:
    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[Hashable, PreparedDelta] = OrderedDict()
        self._pins: dict[Hashable, int] = {}
        self._loading: dict[Hashable, threading.Event] = {}
        self._lock = threading.Lock()
        self._stats = CacheStats()

    def get(self, key: Hashable, load: Callable[[], PreparedDelta]) -> PreparedDelta:
        """The prepared delta for `key`, loading it with `load()` on a miss."""
        while True:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    self._entries.move_to_end(key)
                    self._stats.hits += 1
                    return entry
                pending = self._loading.get(key)
                if pending is None:
                    self._loading[key] = threading.Event()
                    self._stats.misses += 1
                    break
            pending.wait()
        try:
            started = time.perf_counter()
            entry = load()
            elapsed = time.perf_counter() - started
        except BaseException:
            with self._lock:
                self._loading.pop(key).set()
            raise
        with self._lock:
            self._stats.load_seconds_total += elapsed
            self._entries[key] = entry
            self._evict_over_budget(spare=key)  # it is about to be used: evicting it would only thrash
            self._loading.pop(key).set()
        return entry

    @contextmanager
    def pinned(self, keys: Iterable[Hashable]) -> Iterator[None]:
        """Keep `keys` from eviction while a batch runs on them."""
        keys = list(keys)
        with self._lock:
            for key in keys:
                self._pins[key] = self._pins.get(key, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                for key in keys:
                    self._pins[key] -= 1
                    if not self._pins[key]:
                        del self._pins[key]
                self._evict_over_budget()

    def discard(self, key: Hashable) -> None:
        """Forget an entry (its task was replaced or deleted); a running batch keeps its reference."""
        with self._lock:
            self._entries.pop(key, None)

    def discard_task(self, name: str) -> None:
        """Forget every version of a task."""
        with self._lock:
            for key in [k for k in self._entries if isinstance(k, tuple) and k and k[0] == name]:
                del self._entries[key]

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries

    @property
    def resident_bytes(self) -> int:
        with self._lock:
            return sum(entry.nbytes for entry in self._entries.values())

    def resident(self) -> list[tuple[Hashable, int]]:
        """The keys held now with their bytes, least recently used first."""
        with self._lock:
            return [(key, entry.nbytes) for key, entry in self._entries.items()]

    def stats(self) -> dict[str, float]:
        with self._lock:
            return {
                "hits": self._stats.hits,
                "misses": self._stats.misses,
                "evictions": self._stats.evictions,
                "load_seconds_total": self._stats.load_seconds_total,
                "entries": len(self._entries),
                "resident_bytes": sum(entry.nbytes for entry in self._entries.values()),
                "budget_bytes": self.budget_bytes,
            }

    def _evict_over_budget(self, spare: Hashable = None) -> None:
        resident = sum(entry.nbytes for entry in self._entries.values())
        for key in list(self._entries):  # oldest first
            if resident <= self.budget_bytes:
                return
            if key in self._pins or key == spare:
                continue
            resident -= self._entries.pop(key).nbytes
            self._stats.evictions += 1
