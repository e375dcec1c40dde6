"""Batch formation: which waiting rows run together in the next forward.

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

from collections.abc import Sequence
from typing import Protocol, TypeVar


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
