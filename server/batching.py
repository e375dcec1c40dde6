"""Cross-request batching: predict requests for any mix of tasks answered by one engine forward.

Admission first: `Batcher.predict` refuses at once (`Overloaded` -> 429) when what already waits
is too much — counted from admission, so a refusal costs no tokenising and no wait. What waits is
counted in rows (inputs, or windows of long texts), as the engine's cost is: a request is refused
when `max_queue` requests wait, or its rows would take the rows waiting past `max_queue_rows`, or
past `max_queue_s` seconds of the engine's measured rate; so one client's 64-text requests cannot
queue minutes of work in front of everyone, and what was admitted drains within a shutdown's
grace. A request finds room when nothing waits, however large. Retry-After is the measured time
to drain what waits (rows waiting ÷ the engine's measured rows per second), not a constant.

A request whose client went away (the HTTP layer cancels its handler, see
server.api.middleware.DisconnectMiddleware) has its rows taken out of the queue at once: they
never reach the engine, and they stop counting against admission.

Batch formation is length-aware and per row, as TEI's is: the engine pads every row of a forward
to its longest, so a forward costs `longest × rows` tokens, not the sum of the lengths. The
rows (inputs) of a request need not share a forward: `form_batch` takes the oldest waiting row
(always: nothing starves), then grows a window of rows of neighbouring lengths around it —
whichever neighbour adds the least padding — until the padded-token budget or the row limit is
reached. A request is answered when its last row has run. Its task is resolved to the current
version once, in the first forward that runs one of its rows, and that version answers every
row of it, so a replace is never mixed into one request.

The batcher is a pipeline of single-thread stages, as TEI's is, so the engine never waits on
Python work that does not need it:

    event loop:  admit, tokenise (tokenizer thread), queue, form the next batch
    prepare:     resolve each new request's task to its current version, pin every delta of the
                 batch, then load the cold ones (pin first: loading one cold task can no longer
                 evict another of the same batch), re-tokenise where a new version truncates
                 differently; collate, pad, plan the modules and PASTA (`Engine.prepare`)
    engine:      one forward (the engine is not thread-safe: one forward at a time), unpin
    post:        softmax, words and entities of each request whose rows are all done

The next batch is formed as late as it can still be prepared before the engine is free (from
the measured seconds per padded token), so rows arriving meanwhile join it; at most one batch
waits prepared. Tokenisation runs in a thread of its own: a fast tokenizer keeps truncation
settings as state, so it must not be called from two threads at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch

from adapters_store.format import InvalidDelta
from adapters_store.store import DeltaStore, StoreCorrupt, TaskNotFound
from server.backbone import Backbone, EncodedText, TextInput
from server.cache import DeltaCache
from server.delta import PreparedDelta, prepare_delta
from server.engine import Engine, Planned, Row
from server.metrics import Metrics
from server.postprocess import Prediction, UnsupportedInput, predict_row

log = logging.getLogger(__name__)

T = TypeVar("T")


class Overloaded(Exception):
    """The queue is full; try again after `retry_after` seconds."""

    def __init__(self, retry_after: int) -> None:
        self.retry_after = retry_after
        super().__init__(f"the server is overloaded; retry after {retry_after} s")


class ShuttingDown(Exception):
    def __init__(self) -> None:
        super().__init__("the server is shutting down")


@dataclass(frozen=True)
class Answer:
    task: str
    version: int
    predictions: list[Prediction]


@dataclass(eq=False)
class Job:
    """One predict request: its inputs, tokenised with the task's max_length as it was at arrival.

    `delta` and `outputs` are the pipeline's: the version that answers every row of the request
    (set by the prepare stage at its first forward) and each row's logits as they come back.
    """

    task: str
    inputs: list[TextInput]
    encoded: list[EncodedText]
    max_length: int
    future: asyncio.Future[Answer] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    delta: PreparedDelta | Exception | None = None
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)
    queued: int = 0  # rows still waiting for a batch
    # Where the request's time went (metrics: deltaserve_<stage>_seconds), filled in by the pipeline.
    enqueued_at: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.encoded)

    @property
    def rows(self) -> int:
        return len(self.encoded)

    @property
    def longest(self) -> int:
        return max((len(e.input_ids) for e in self.encoded), default=0)

    def items(self) -> list[Item]:
        return [Item(self, i) for i in range(len(self.encoded))]


@dataclass(frozen=True, eq=False)
class Item:
    """One row of a job: what batch formation places."""

    job: Job
    index: int

    @property
    def tokens(self) -> int:
        return len(self.job.encoded[self.index].input_ids)

    longest = tokens

    @property
    def rows(self) -> int:
        return 1


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


class Tokenizer:
    """Serialises all tokenisation through one thread (see the module docstring)."""

    def __init__(self, backbone: Backbone) -> None:
        self.backbone = backbone
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="deltaserve-tokenize")

    async def encode(self, inputs: Sequence[TextInput], max_length: int) -> list[EncodedText]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self.backbone.encode, inputs, max_length)

    def encode_blocking(self, inputs: Sequence[TextInput], max_length: int) -> list[EncodedText]:
        return self._pool.submit(self.backbone.encode, inputs, max_length).result()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Other tokenizer work (the windows of long texts, server.windows), on the same one thread."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


@dataclass(eq=False)
class Prepared:
    """A batch made ready for the engine: its requests' deltas resolved and pinned, its rows built."""

    items: list[Item]  # the rows that run (rows of failed requests left out)
    failed: list[Job]  # requests whose task could not be resolved or loaded: answered with `job.delta`
    rows: list[Row]
    pins: contextlib.ExitStack
    planned: Planned | None = None  # collated, padded and planned by the engine

    def release(self) -> None:
        self.pins.close()


Outcome = tuple[Job, "Answer | Exception"]


class Runner(Protocol):
    """The batcher's three worker stages (see the module docstring)."""

    tokenizer: Tokenizer

    def max_length(self, task_max_length: int | None) -> int: ...
    def prepare(self, items: Sequence[Item]) -> Prepared: ...
    def forward(self, prepared: Prepared) -> list[torch.Tensor]: ...
    def finish(self, prepared: Prepared, outputs: Sequence[torch.Tensor]) -> list[Outcome]: ...


class BatchRunner:
    """Prepares, runs and post-processes batches of rows; each stage runs in its own worker thread."""

    def __init__(self, backbone: Backbone, engine: Engine, cache: DeltaCache, store: DeltaStore,
                 tokenizer: Tokenizer, default_max_length: int) -> None:
        self.backbone = backbone
        self.engine = engine
        self.cache = cache
        self.store = store
        self.tokenizer = tokenizer
        self.default_max_length = default_max_length

    def max_length(self, task_max_length: int | None) -> int:
        """Truncation for a task: its delta's max_length, else the server default."""
        return min(task_max_length or self.default_max_length, self.backbone.max_positions)

    def __call__(self, jobs: Sequence[Job]) -> list[Answer | Exception]:
        """Whole jobs through the three stages in one forward (one caller, no pipeline)."""
        prepared = self.prepare([item for job in jobs for item in job.items()])
        outcomes = dict((id(job), result) for job, result in self.finish(prepared, self.forward(prepared)))
        return [outcomes[id(job)] for job in jobs]

    def prepare(self, items: Sequence[Item]) -> Prepared:
        pins = contextlib.ExitStack()
        try:
            fresh = {}
            for item in items:
                if item.job.delta is None:
                    fresh.setdefault(id(item.job), item.job)
            resolved = self._resolve_all(sorted({job.task for job in fresh.values()}), pins)
            for job in fresh.values():
                delta = resolved[job.task]
                if not isinstance(delta, Exception):
                    limit = self.max_length(delta.meta.max_length)
                    if limit != job.max_length:
                        # The version that answers truncates differently from the one seen at arrival.
                        encoded = self.tokenizer.encode_blocking(job.inputs, limit)
                        if len(encoded) != len(job.encoded):
                            raise RuntimeError("re-tokenising changed the number of rows of a request")
                        job.encoded, job.max_length = encoded, limit
                job.delta = delta
            # Requests resolved in an earlier forward keep their version; pin it while this one runs.
            pins.enter_context(self.cache.pinned({d.key for d in (i.job.delta for i in items)
                                                  if isinstance(d, PreparedDelta)}))
            ready = [i for i in items if isinstance(i.job.delta, PreparedDelta)]
            failed = list({id(i.job): i.job for i in items if isinstance(i.job.delta, Exception)}.values())
            rows = [Row(i.job.delta, i.job.encoded[i.index]) for i in ready]  # type: ignore[arg-type]
            planned = self.engine.prepare(rows)
        except BaseException:
            pins.close()
            raise
        return Prepared(ready, failed, rows, pins, planned)

    def forward(self, prepared: Prepared) -> list[torch.Tensor]:
        try:
            assert prepared.planned is not None
            return self.engine.run(prepared.planned)
        finally:
            prepared.release()

    def finish(self, prepared: Prepared, outputs: Sequence[torch.Tensor]) -> list[Outcome]:
        """Outcomes of the requests this forward completed (and of those that failed)."""
        done: list[Outcome] = [(job, job.delta) for job in prepared.failed]  # type: ignore[misc]
        for item, output in zip(prepared.items, outputs, strict=True):
            job = item.job
            job.outputs[item.index] = output
            if len(job.outputs) == len(job.encoded):
                done.append((job, self._answer(job)))
        return done

    def _answer(self, job: Job) -> Answer | Exception:
        delta = job.delta
        assert isinstance(delta, PreparedDelta)
        try:
            predictions = [predict_row(job.outputs[i].numpy(), delta.meta, text, source)
                           for i, (text, source) in enumerate(zip(job.encoded, job.inputs, strict=True))]
        except UnsupportedInput as err:
            return err
        finally:
            job.outputs = {}  # the logits are no longer needed
        return Answer(job.task, delta.version, predictions)

    def _resolve_all(self, names: Sequence[str], pins: contextlib.ExitStack) -> dict[str, PreparedDelta | Exception]:
        """Each task's current version, every one pinned before any is loaded."""
        keys: dict[str, tuple[str, int] | Exception] = {}
        for name in names:
            info = self.store.get_info(name)
            keys[name] = TaskNotFound(name) if info is None else (name, info.version)
        pins.enter_context(self.cache.pinned([k for k in keys.values() if not isinstance(k, Exception)]))
        resolved: dict[str, PreparedDelta | Exception] = {}
        for name, key in keys.items():
            resolved[name] = key if isinstance(key, Exception) else self._load(name, key[1], pins)
        return resolved

    def _load(self, name: str, version: int, pins: contextlib.ExitStack) -> PreparedDelta | Exception:
        for _ in range(3):
            def load(version: int = version) -> PreparedDelta:
                return prepare_delta(self.store.read_bytes(name, version), self.backbone, name, version)

            try:
                return self.cache.get((name, version), load)
            except TaskNotFound:
                pass  # replaced between reading the manifest and the file: take the newer one
            except (InvalidDelta, StoreCorrupt) as err:  # fails this task's requests, not the batch
                return err
            info = self.store.get_info(name)
            if info is None:
                return TaskNotFound(name)
            version = info.version
            pins.enter_context(self.cache.pinned([(name, version)]))
        return TaskNotFound(name)


class Batcher:
    def __init__(
        self,
        runner: Runner,
        *,
        max_batch_tokens: int,
        max_batch_requests: int,
        wait_s: float,
        max_queue: int,
        max_queue_rows: int | None = None,
        max_queue_s: float | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.runner = runner
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_rows = max_batch_requests  # one input, one row: the limit bounds the forward's rows
        self.wait_s = wait_s
        self.max_queue = max_queue
        self.max_queue_rows = max_queue_rows
        self.max_queue_s = max_queue_s
        self.metrics = metrics
        self._pending: list[Item] = []  # rows waiting for a batch, oldest first
        self._admitted = 0  # requests admitted with rows not yet in a batch: tokenising or queued
        self._waiting_rows = 0  # their rows (inputs while tokenising)
        self._in_flight = 0  # batches formed and not yet answered
        self._arrived = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._prepare_pool = ThreadPoolExecutor(1, thread_name_prefix="deltaserve-prepare")
        self._engine_pool = ThreadPoolExecutor(1, thread_name_prefix="deltaserve-engine")
        self._post_pool = ThreadPoolExecutor(1, thread_name_prefix="deltaserve-post")
        self._loop_task: asyncio.Task[None] | None = None
        self._completing: set[asyncio.Task[None]] = set()
        self._closing = False
        # Running means: rows the engine answers a second (Retry-After), seconds per padded token
        # of a forward and seconds to prepare a batch (when to form the next batch).
        self._rows_per_s: float | None = None
        self._s_per_token = 1e-4
        self._prepare_s = 0.002

    @property
    def depth(self) -> int:
        """Requests admitted with rows still waiting for a batch (tokenising or queued)."""
        return self._admitted

    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._loop(), name="deltaserve-batcher")

    async def predict(self, task: str, inputs: list[TextInput], max_length: int) -> Answer:
        """Admit (or refuse at once), tokenise, queue, and wait for the answer."""
        self._admit(len(inputs))
        began = time.perf_counter()
        try:
            encoded = await self.runner.tokenizer.encode(inputs, max_length)
        except BaseException as err:
            self._leave(1, len(inputs))
            if isinstance(err, asyncio.CancelledError) and self.metrics:  # the client left while it tokenised
                self.metrics.abandoned.inc()
            raise
        self._waiting_rows += len(encoded) - len(inputs)
        job = Job(task, inputs, encoded, max_length)
        job.stage_seconds["tokenize"] = time.perf_counter() - began
        return await self._enqueue(job)

    async def submit(self, job: Job) -> Answer:
        """Queue an already tokenised job (admission as for `predict`)."""
        self._admit(job.rows)
        return await self._enqueue(job)

    def retry_after(self) -> int:
        """Seconds until what waits now has drained, at the engine's measured rate."""
        if not self._rows_per_s:
            return 1
        return max(1, math.ceil((self._waiting_rows + 1) / self._rows_per_s))

    def drain_seconds(self, rows: int) -> float | None:
        """Seconds the engine needs for `rows` at its measured rate (None before any forward)."""
        return rows / self._rows_per_s if self._rows_per_s else None

    def stop_admitting(self) -> None:
        """From now on every new request is refused (`ShuttingDown`, 503); what was admitted still runs."""
        self._closing = True
        self._arrived.set()  # a batch waiting for company runs now: nothing more will join it

    async def close(self) -> None:
        """Refuse new work, finish everything accepted, stop the loop and the workers."""
        self.stop_admitting()
        if self._loop_task is not None and not self._loop_task.done():
            await self._idle.wait()
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        for pool in (self._prepare_pool, self._engine_pool, self._post_pool):
            pool.shutdown(wait=True)

    # ------------------------------------------------------------------ internals

    def _admit(self, rows: int) -> None:
        if self._closing:
            raise ShuttingDown()
        if self._admitted and self._queue_full(rows):
            if self.metrics:
                self.metrics.rejected.inc()
            raise Overloaded(self.retry_after())
        self._admitted += 1
        self._waiting_rows += rows
        self._idle.clear()
        self._observe_depth()

    def _queue_full(self, rows: int) -> bool:
        """Whether admitting `rows` more would pass a bound of the queue (requests, rows, seconds of work)."""
        after = self._waiting_rows + rows
        drain = self.drain_seconds(after)
        return (self._admitted >= self.max_queue
                or (self.max_queue_rows is not None and after > self.max_queue_rows)
                or (self.max_queue_s is not None and drain is not None and drain > self.max_queue_s))

    def _leave(self, jobs: int, rows: int) -> None:
        self._admitted -= jobs
        self._waiting_rows -= rows
        self._observe_depth()
        self._check_idle()

    async def _enqueue(self, job: Job) -> Answer:
        job.queued = job.rows
        job.enqueued_at = time.perf_counter()
        self._pending.extend(job.items())  # admitted before any close began: it is answered
        self._arrived.set()
        job.future.add_done_callback(lambda future: future.cancelled() and self._abandoned(job))
        return await job.future  # a client that goes away cancels the future: its rows leave the queue

    def _abandoned(self, job: Job) -> None:
        if self.metrics:
            self.metrics.abandoned.inc()
        self._drop(job)

    def _drop(self, job: Job) -> None:
        """Take the rows of a request nobody waits for any more out of the queue (none reaches the engine)."""
        if job.queued == 0:
            return
        self._pending = [item for item in self._pending if item.job is not job]
        self._leave(1, job.queued)
        job.queued = 0

    def _check_idle(self) -> None:
        if not self._admitted and not self._in_flight:
            self._idle.set()

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        engine_busy: asyncio.Future | None = None  # the forward now in the engine
        engine_eta = 0.0  # when it should end (perf_counter), from the measured seconds per padded token
        while True:
            if not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
            busy = engine_busy is not None and not engine_busy.done()
            if busy:
                # Form the next batch as late as it can still be ready in time: what arrives while
                # the engine runs joins it, and the length-aware choice sees more candidates.
                lead = self._prepare_s + 0.003
                timeout = engine_eta - lead - time.perf_counter()
                if timeout > 0:
                    await asyncio.wait([engine_busy], timeout=timeout)
            else:
                await self._wait_for_company()
            batch = self._take_batch()
            if not batch:
                continue
            self._in_flight += 1
            began = time.perf_counter()
            try:
                prepared = await loop.run_in_executor(self._prepare_pool, self.runner.prepare, batch)
            except Exception as err:  # a bug: every request of the batch gets it
                log.exception("preparing a batch failed")
                self._answer([(item.job, err) for item in batch])
                self._in_flight -= 1
                self._check_idle()
                continue
            self._prepare_s = 0.8 * self._prepare_s + 0.2 * (time.perf_counter() - began)
            if engine_busy is not None:
                await asyncio.wait([engine_busy])  # one batch waits prepared; no more
            prepared = await self._without_abandoned(prepared)
            if prepared is None:  # every request of it went away while it waited
                self._in_flight -= 1
                self._check_idle()
                continue
            started = time.perf_counter()
            cost = max(1, padded_tokens(prepared.items))
            engine_eta = started + self._s_per_token * cost
            engine_busy = loop.run_in_executor(self._engine_pool, self.runner.forward, prepared)
            task = loop.create_task(self._complete(prepared, engine_busy, started, cost))
            self._completing.add(task)  # a reference, or the task may be collected mid-flight
            task.add_done_callback(self._completing.discard)

    async def _without_abandoned(self, prepared: Prepared) -> Prepared | None:
        """The prepared batch without the rows of requests whose client left while it waited for the
        engine (prepared again from the rest; None when no row is left), so none of them is computed."""
        live = [item for item in prepared.items if not item.job.future.cancelled()]
        if len(live) == len(prepared.items):
            return prepared
        try:
            if not live:
                self._answer([(job, job.delta) for job in prepared.failed])  # type: ignore[misc]
                return None
            loop = asyncio.get_running_loop()
            try:
                fresh = await loop.run_in_executor(self._prepare_pool, self.runner.prepare, live)
            except Exception as err:  # a bug: every request of the batch gets it
                log.exception("preparing a batch failed")
                self._answer([(job, err) for job in {id(i.job): i.job for i in live}.values()])
                return None
            fresh.failed.extend(prepared.failed)
            return fresh
        finally:
            prepared.release()  # after the new pins: what the live rows use stays resident

    async def _wait_for_company(self) -> None:
        """The engine is idle: wait up to `wait_s` for more rows, unless a batch is full already."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        while len(self._pending) < self.max_batch_rows and not self._closing:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)

    def _take_batch(self) -> list[Item]:
        """A length-aware batch of rows out of the queue (rows of requests whose client went away are dropped)."""
        for job in {id(i.job): i.job for i in self._pending if i.job.future.done()}.values():
            self._drop(job)  # cancelled, its callback not yet run
        batch = form_batch(self._pending, self.max_batch_tokens, self.max_batch_rows)
        now = time.perf_counter()
        for item in batch:
            item.job.stage_seconds.setdefault("queue", now - item.job.enqueued_at)
        chosen = {id(i) for i in batch}
        self._pending = [i for i in self._pending if id(i) not in chosen]
        left = 0
        for item in batch:
            item.job.queued -= 1
            left += item.job.queued == 0
        self._leave(left, len(batch))
        return batch

    async def _complete(self, prepared: Prepared, forward: asyncio.Future, started: float, cost: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            try:
                outputs = await forward
                seconds = time.perf_counter() - started
                rate = len(prepared.rows) / max(seconds, 1e-6)
                self._rows_per_s = rate if self._rows_per_s is None else 0.8 * self._rows_per_s + 0.2 * rate
                self._s_per_token = 0.8 * self._s_per_token + 0.2 * seconds / cost
                if self.metrics:
                    self.metrics.batch_requests.observe(len({id(i.job) for i in prepared.items}))
                    self.metrics.batch_rows.observe(len(prepared.rows))
                    self.metrics.batch_tasks.observe(len({i.job.task for i in prepared.items}))
                    self.metrics.batch_seconds.observe(seconds)
                    self.metrics.batch_tokens.inc(sum(i.tokens for i in prepared.items))
                    self.metrics.batch_padded_tokens.inc(padded_tokens(prepared.items))
                finishing = time.perf_counter()
                outcomes = await loop.run_in_executor(self._post_pool, self.runner.finish, prepared, outputs)
                post_seconds = time.perf_counter() - finishing
                for job in {id(i.job): i.job for i in prepared.items}.values():
                    job.stage_seconds["inference"] = job.stage_seconds.get("inference", 0.0) + seconds
                    job.stage_seconds["postprocess"] = job.stage_seconds.get("postprocess", 0.0) + post_seconds
            except Exception as err:  # a bug in the engine: every request of the batch gets it
                log.exception("engine batch failed")
                outcomes = [(job, err) for job in {id(i.job): i.job for i in prepared.items}.values()]
                outcomes += [(job, err) for job in prepared.failed]
            self._answer(outcomes)
        finally:
            self._in_flight -= 1
            self._check_idle()

    def _answer(self, outcomes: Sequence[Outcome]) -> None:
        for job, result in outcomes:
            if job.future.done():
                continue
            if isinstance(result, Exception):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)
                self._observe_stages(job)

    def _observe_stages(self, job: Job) -> None:
        if self.metrics:
            for stage, seconds in job.stage_seconds.items():
                self.metrics.stage_seconds[stage].observe(seconds)

    def _observe_depth(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.set(self._admitted)
            self.metrics.queue_rows.set(self._waiting_rows)
