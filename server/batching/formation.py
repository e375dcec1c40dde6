"""Batch formation: which waiting rows run together in the next forward (`form_batch`; with tenants,
`FairShare`, which shares the rows among them by weight).

Batch formation is length-aware and per row, as TEI's is: the engine pads every row of a forward
to its longest, so a forward costs `longest × rows` tokens, not the sum of the lengths. The
rows (inputs) of a request need not share a forward: `form_batch` takes the oldest waiting row
(always: nothing starves), then grows a window of rows of neighbouring lengths around it —
whichever neighbour adds the least padding — until the padded-token budget or the row limit is
reached. A request is answered when its last row has run. Its task is resolved to the current
version once, in the first forward that runs one of its rows, and that version answers every
row of it, so a replace is never mixed into one request.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from typing import Generic, Protocol, TypeVar


class Sized(Protocol):
    @property
    def longest(self) -> int: ...
    @property
    def rows(self) -> int: ...
    @property
    def tokens(self) -> int: ...


S = TypeVar("S", bound=Sized)


def padded_tokens(parts: Sequence[Sized]) -> int:
    """What a forward over `parts` (rows or whole jobs) costs the engine: every row padded to the longest."""
    return max((p.longest for p in parts), default=0) * sum(p.rows for p in parts)


def form_batch(waiting: Sequence[S], max_tokens: int, max_rows: int) -> list[S]:
    """The next batch from `waiting` (oldest first): length-aware, the oldest always included.

    `waiting` holds rows (`Item`s) or whole jobs. They are ordered by length (a job's: its
    longest row); the batch is a window of that order around the oldest, grown one neighbour at
    a time — the shorter or the longer one, whichever adds fewer padding tokens — while the
    padded cost (`longest × rows`) stays within `max_tokens` and the rows within `max_rows`. An
    oldest over the budget on its own runs alone. Returned in arrival order.
    """
    if not waiting:
        return []
    oldest = waiting[0]
    order = sorted(range(len(waiting)), key=lambda i: (waiting[i].longest, i))
    at = order.index(0)
    lo, hi = at, at + 1  # the window order[lo:hi]
    longest, rows = oldest.longest, oldest.rows
    while True:
        options = []  # (added padding, new longest, part, side)
        if lo > 0:
            part = waiting[order[lo - 1]]
            options.append((longest * part.rows - part.tokens, longest, part, -1))
        if hi < len(order):
            part = waiting[order[hi]]
            options.append(((part.longest - longest) * rows + part.longest * part.rows - part.tokens,
                            part.longest, part, +1))
        options = [o for o in options if o[1] * (rows + o[2].rows) <= max_tokens and rows + o[2].rows <= max_rows]
        if not options:
            break
        _, longest, part, side = min(options, key=lambda o: (o[0], o[3]))
        rows += part.rows
        if side < 0:
            lo -= 1
        else:
            hi += 1
    return [waiting[i] for i in sorted(order[lo:hi])]


class Owned(Sized, Protocol):
    @property
    def tenant(self) -> str | None: ...


P = TypeVar("P", bound=Owned)


class FairShare:
    """Batch formation that shares the engine among tenants in proportion to their weights (`--tenants-file`).
    It forms batches of rows (one row each, as the pipeline queues them).

    A virtual token counter per tenant, as the VTC scheduler of "Fairness in Serving Large Language Models"
    (Sheng et al., OSDI '24) keeps: every row a tenant gets into a forward adds its tokens ÷ the tenant's
    weight to the tenant's counter, and the next row goes to the tenant with queued rows whose counter is
    lowest. A tenant that had nothing queued has its counter lifted to the lowest counter of those that
    did (the highest known when nobody did), so idle time earns no credit to flood with later.

    Formation stays length-aware and work-conserving: each next row of a batch goes to the tenant with the
    lowest counter; its first row in the batch is its oldest (as `form_batch` always takes the oldest: no
    row starves), its next ones those that add the least padding, as long as they fit (the padded-token
    budget, the row limit); when that tenant has none that fits, the next tenant's, so the batch fills
    whoever waits. With one tenant queued it is `form_batch`, row
    for row. The counters move only when rows are taken, never with the clock.
    """

    def __init__(self, weight: Callable[[str | None], float]) -> None:
        self.weight = weight
        self.counters: dict[str | None, float] = {}
        self._queued: set[str | None] = set()  # tenants with rows queued at the last formation

    def form(self, waiting: Sequence[P], max_tokens: int, max_rows: int) -> list[P]:
        """The next batch from `waiting` (oldest first), the tenants' counters charged for it."""
        groups: dict[str | None, list[P]] = {}
        for part in waiting:
            groups.setdefault(part.tenant, []).append(part)
        self._lift(groups)
        if len(groups) > 1:
            batch, self.counters = self._share(waiting, groups, max_tokens, max_rows)
            return batch
        batch = form_batch(waiting, max_tokens, max_rows)
        for part in batch:
            self._charge(self.counters, part)
        return batch

    def _lift(self, groups: dict[str | None, list[P]]) -> None:
        before = [self.counters.get(t, 0.0) for t in self._queued if t in self.counters]
        floor = min(before) if before else max(self.counters.values(), default=0.0)
        for tenant in groups:
            if tenant not in self._queued:
                self.counters[tenant] = max(self.counters.get(tenant, 0.0), floor)
        self._queued = set(groups)

    def _charge(self, counters: dict[str | None, float], part: Owned) -> None:
        counters[part.tenant] = counters.get(part.tenant, 0.0) + part.tokens / max(self.weight(part.tenant), 1e-9)

    def _share(self, waiting: Sequence[P], groups: dict[str | None, list[P]], max_tokens: int,
               max_rows: int) -> tuple[list[P], dict[str | None, float]]:
        counters = dict(self.counters)
        arrival = {id(part): i for i, part in enumerate(waiting)}
        queues = {tenant: _ByLength(parts, arrival) for tenant, parts in groups.items()}
        batch: list[P] = []
        started: set[str | None] = set()  # tenants with a row in the batch
        longest = rows = 0
        while rows < max_rows:
            by_counter = sorted((t for t in queues if queues[t]), key=lambda t: (counters[t], queues[t].first_arrival))
            for tenant in by_counter:
                queue = queues[tenant]
                # A tenant's first row in a batch is its oldest (the batch's first, whatever its size): no row
                # of a tenant starves, however its length sits against the others'; then the least padding.
                at = queue.oldest() if tenant not in started else None
                if at is not None and batch and max(longest, queue.keys[at][0]) * (rows + 1) > max_tokens:
                    at = None
                if at is None:
                    at = queue.best(longest, rows, max_tokens)
                if at is not None:
                    started.add(tenant)
                    pick = queue.take(at)
                    batch.append(pick)
                    longest, rows = max(longest, pick.longest), rows + 1
                    self._charge(counters, pick)
                    break
            else:
                break
        return sorted(batch, key=lambda p: arrival[id(p)]), counters


class _ByLength(Generic[P]):
    """One tenant's queued rows ordered by (length, arrival), for the least-padding pick in O(log n)."""

    def __init__(self, parts: list[P], arrival: dict[int, int]) -> None:
        ordered = sorted(parts, key=lambda p: (p.longest, arrival[id(p)]))
        self.keys = [(p.longest, arrival[id(p)]) for p in ordered]
        self.parts = ordered
        self._length_of = dict((a, length) for length, a in self.keys)
        self._arrivals = sorted(self._length_of)  # oldest first; taken ones skipped lazily
        self._head = 0

    def __bool__(self) -> bool:
        return bool(self.parts)

    @property
    def first_arrival(self) -> int:
        while self._arrivals[self._head] not in self._length_of:
            self._head += 1
        return self._arrivals[self._head]

    def oldest(self) -> int:
        first = self.first_arrival
        return bisect.bisect_left(self.keys, (self._length_of[first], first))

    def best(self, longest: int, rows: int, max_tokens: int) -> int | None:
        """The row that pads a batch of `rows` rows up to `longest` least, if one fits (ties: the shorter, older)."""
        above = bisect.bisect_right(self.keys, (longest, math.inf))
        options = []  # (padding added, index)
        if above > 0 and longest * (rows + 1) <= max_tokens:
            length = self.keys[above - 1][0]
            options.append((longest - length, bisect.bisect_left(self.keys, (length, -1))))
        if above < len(self.keys) and self.keys[above][0] * (rows + 1) <= max_tokens:
            options.append(((self.keys[above][0] - longest) * rows, above))
        return min(options)[1] if options else None

    def take(self, at: int) -> P:
        _, arrived = self.keys.pop(at)
        del self._length_of[arrived]
        return self.parts.pop(at)
