"""Cross-request batching: predict requests for any mix of tasks answered by one engine forward.

Admission first: `Batcher.predict` refuses at once (`Overloaded` -> 429) when `max_queue`
requests are already waiting — counted from admission, so a refusal costs no tokenising and no
wait — and its Retry-After is the measured time to drain what waits (requests ÷ the engine's
measured requests per second), not a constant.

Batch formation is length-aware, as TEI's token budget is: the engine pads every row of a
forward to its longest, so a forward costs `longest × rows` tokens, not the sum of the lengths.
`form_batch` takes the oldest waiting request (always: nothing starves), then grows a window of
requests of neighbouring lengths around it — whichever neighbour adds the least padding — until
the padded-token budget or the request limit is reached.

The batcher is a pipeline of single-thread stages, as TEI's is, so the engine never waits on
Python work that does not need it:

    event loop:  admit, tokenise (tokenizer thread), queue, form the next batch
    prepare:     resolve each task to its current version, pin every delta of the batch, then
                 load the cold ones (pin first: loading one cold task can no longer evict another
                 of the same batch), re-tokenise where a new version truncates differently
    engine:      one forward (the engine is not thread-safe: one forward at a time), unpin
    post:        softmax, words and entities per row, then answer the futures

The next batch is formed and prepared while the current one runs in the engine; at most one
batch waits prepared. Tokenisation runs in a thread of its own: a fast tokenizer keeps
truncation settings as state, so it must not be called from two threads at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import torch

from adapters_store.format import InvalidDelta
from adapters_store.storage import DeltaStore, StoreCorrupt, TaskNotFound
from server.backbone import Backbone, EncodedText, TextInput
from server.cache import DeltaCache
from server.delta import PreparedDelta, prepare_delta
from server.engine import Engine, Row
from server.metrics import Metrics
from server.postprocess import Prediction, UnsupportedInput, predict_row

log = logging.getLogger(__name__)


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
    """One predict request: its inputs, tokenised with the task's max_length as it was at arrival."""

    task: str
    inputs: list[TextInput]
    encoded: list[EncodedText]
    max_length: int
    future: asyncio.Future[Answer] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    arrived: float = field(default_factory=time.monotonic)

    @property
    def tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.encoded)

    @property
    def rows(self) -> int:
        return len(self.encoded)

    @property
    def longest(self) -> int:
        return max((len(e.input_ids) for e in self.encoded), default=0)


def padded_tokens(jobs: Sequence[Job]) -> int:
    """What a forward over `jobs` costs the engine: every row padded to the longest."""
    return max((j.longest for j in jobs), default=0) * sum(j.rows for j in jobs)


def form_batch(waiting: Sequence[Job], max_tokens: int, max_requests: int) -> list[Job]:
    """The next batch from `waiting` (oldest first): length-aware, the oldest always included.

    Requests are ordered by their longest row; the batch is a window of that order around the
    oldest request, grown one neighbour at a time — the shorter or the longer one, whichever
    adds fewer padding tokens — while the padded cost (`longest × rows`) stays within
    `max_tokens` and the batch within `max_requests`. A request over the budget on its own runs
    alone. Returned in arrival order.
    """
    if not waiting:
        return []
    oldest = waiting[0]
    order = sorted(range(len(waiting)), key=lambda i: (waiting[i].longest, i))
    at = order.index(0)
    lo, hi = at, at + 1  # the window order[lo:hi]
    longest, rows, tokens = oldest.longest, oldest.rows, oldest.tokens
    while hi - lo < max_requests:
        options = []  # (added padding, new longest, side)
        if lo > 0:
            job = waiting[order[lo - 1]]
            options.append((longest * job.rows - job.tokens, longest, job, -1))
        if hi < len(order):
            job = waiting[order[hi]]
            options.append(((job.longest - longest) * rows + job.longest * job.rows - job.tokens,
                            job.longest, job, +1))
        options = [o for o in options if o[1] * (rows + o[2].rows) <= max_tokens]
        if not options:
            break
        _, longest, job, side = min(options, key=lambda o: (o[0], o[3]))
        rows += job.rows
        tokens += job.tokens
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

    def close(self) -> None:
        self._pool.shutdown(wait=True)


@dataclass(eq=False)
class Prepared:
    """A batch made ready for the engine: its deltas resolved and pinned, its rows built."""

    jobs: list[Job]
    resolved: dict[str, PreparedDelta | Exception]
    rows: list[Row]
    spans: list[tuple[int, list[EncodedText]]]  # per job: first row, its (re-)tokenised inputs
    pins: contextlib.ExitStack

    def release(self) -> None:
        self.pins.close()


class Runner(Protocol):
    """The batcher's three worker stages (see the module docstring)."""

    tokenizer: Tokenizer

    def max_length(self, task_max_length: int | None) -> int: ...
    def prepare(self, jobs: Sequence[Job]) -> Prepared: ...
    def forward(self, prepared: Prepared) -> list[torch.Tensor]: ...
    def finish(self, prepared: Prepared, outputs: Sequence[torch.Tensor]) -> list[Answer | Exception]: ...


class BatchRunner:
    """Prepares, runs and post-processes batches of jobs; each stage runs in its own worker thread."""

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
        """The three stages in a row (one caller, no pipeline)."""
        prepared = self.prepare(jobs)
        return self.finish(prepared, self.forward(prepared))

    def prepare(self, jobs: Sequence[Job]) -> Prepared:
        pins = contextlib.ExitStack()
        try:
            resolved = self._resolve_all(sorted({job.task for job in jobs}), pins)
            rows: list[Row] = []
            spans: list[tuple[int, list[EncodedText]]] = []
            for job in jobs:
                delta = resolved[job.task]
                if isinstance(delta, Exception):
                    spans.append((len(rows), []))
                    continue
                limit = self.max_length(delta.meta.max_length)
                # The version that answers may truncate differently from the one seen at arrival.
                encoded = job.encoded if limit == job.max_length else self.tokenizer.encode_blocking(job.inputs, limit)
                spans.append((len(rows), encoded))
                rows.extend(Row(delta, text) for text in encoded)
        except BaseException:
            pins.close()
            raise
        return Prepared(list(jobs), resolved, rows, spans, pins)

    def forward(self, prepared: Prepared) -> list[torch.Tensor]:
        try:
            return self.engine.forward(prepared.rows)
        finally:
            prepared.release()

    def finish(self, prepared: Prepared, outputs: Sequence[torch.Tensor]) -> list[Answer | Exception]:
        results: list[Answer | Exception] = []
        for job, (start, encoded) in zip(prepared.jobs, prepared.spans, strict=True):
            delta = prepared.resolved[job.task]
            if isinstance(delta, Exception):
                results.append(delta)
                continue
            try:
                predictions = [
                    predict_row(outputs[start + i].numpy(), delta.meta, text, source)
                    for i, (text, source) in enumerate(zip(encoded, job.inputs, strict=True))
                ]
            except UnsupportedInput as err:
                results.append(err)
                continue
            results.append(Answer(job.task, delta.version, predictions))
        return results

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
        metrics: Metrics | None = None,
    ) -> None:
        self.runner = runner
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_requests = max_batch_requests
        self.wait_s = wait_s
        self.max_queue = max_queue
        self.metrics = metrics
        self._pending: list[Job] = []  # oldest first
        self._admitted = 0  # admitted and not yet in a batch: tokenising or pending
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
        # Running means: requests the engine answers a second (Retry-After), seconds per padded token
        # of a forward and seconds to prepare a batch (when to form the next batch).
        self._drain_per_s: float | None = None
        self._s_per_token = 1e-4
        self._prepare_s = 0.002

    @property
    def depth(self) -> int:
        """Requests admitted and waiting for a batch (tokenising or queued)."""
        return self._admitted

    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._loop(), name="deltaserve-batcher")

    async def predict(self, task: str, inputs: list[TextInput], max_length: int) -> Answer:
        """Admit (or refuse at once), tokenise, queue, and wait for the answer."""
        self._admit()
        try:
            encoded = await self.runner.tokenizer.encode(inputs, max_length)
        except BaseException:
            self._leave()
            raise
        return await self._enqueue(Job(task, inputs, encoded, max_length))

    async def submit(self, job: Job) -> Answer:
        """Queue an already tokenised job (admission as for `predict`)."""
        self._admit()
        return await self._enqueue(job)

    def retry_after(self) -> int:
        """Seconds until what waits now has drained, at the engine's measured rate."""
        if not self._drain_per_s:
            return 1
        return max(1, math.ceil((self._admitted + 1) / self._drain_per_s))

    async def close(self) -> None:
        """Refuse new work, finish everything accepted, stop the loop and the workers."""
        self._closing = True
        if self._loop_task is not None and not self._loop_task.done():
            await self._idle.wait()
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        for pool in (self._prepare_pool, self._engine_pool, self._post_pool):
            pool.shutdown(wait=True)

    # ------------------------------------------------------------------ internals

    def _admit(self) -> None:
        if self._closing:
            raise ShuttingDown()
        if self._admitted >= self.max_queue:
            if self.metrics:
                self.metrics.rejected.inc()
            raise Overloaded(self.retry_after())
        self._admitted += 1
        self._idle.clear()
        self._observe_depth()

    def _leave(self, count: int = 1) -> None:
        self._admitted -= count
        self._observe_depth()
        self._check_idle()

    async def _enqueue(self, job: Job) -> Answer:
        self._pending.append(job)  # admitted before any close began: it is answered
        self._arrived.set()
        return await job.future  # a client that goes away cancels the future; the batch skips it

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
                self._answer(batch, [err] * len(batch))
                self._in_flight -= 1
                self._check_idle()
                continue
            self._prepare_s = 0.8 * self._prepare_s + 0.2 * (time.perf_counter() - began)
            if engine_busy is not None:
                await asyncio.wait([engine_busy])  # one batch waits prepared; no more
            started = time.perf_counter()
            cost = max(1, padded_tokens(batch))
            engine_eta = started + self._s_per_token * cost
            engine_busy = loop.run_in_executor(self._engine_pool, self.runner.forward, prepared)
            task = loop.create_task(self._complete(prepared, engine_busy, started, cost))
            self._completing.add(task)  # a reference, or the task may be collected mid-flight
            task.add_done_callback(self._completing.discard)

    async def _wait_for_company(self) -> None:
        """The engine is idle: wait up to `wait_s` for more requests, unless a batch is full already."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        while len(self._pending) < self.max_batch_requests and not self._closing:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)

    def _take_batch(self) -> list[Job]:
        """A length-aware batch out of the queue (requests whose client went away are dropped)."""
        live = [j for j in self._pending if not j.future.done()]
        gone = len(self._pending) - len(live)
        batch = form_batch(live, self.max_batch_tokens, self.max_batch_requests)
        chosen = {id(j) for j in batch}
        self._pending = [j for j in live if id(j) not in chosen]
        self._leave(gone + len(batch))
        return batch

    async def _complete(self, prepared: Prepared, forward: asyncio.Future, started: float, cost: int) -> None:
        loop = asyncio.get_running_loop()
        batch = prepared.jobs
        try:
            try:
                outputs = await forward
                seconds = time.perf_counter() - started
                rate = len(batch) / max(seconds, 1e-6)
                self._drain_per_s = rate if self._drain_per_s is None else 0.8 * self._drain_per_s + 0.2 * rate
                self._s_per_token = 0.8 * self._s_per_token + 0.2 * seconds / cost
                if self.metrics:
                    self.metrics.batch_requests.observe(len(batch))
                    self.metrics.batch_rows.observe(sum(job.rows for job in batch))
                    self.metrics.batch_tasks.observe(len({job.task for job in batch}))
                    self.metrics.batch_seconds.observe(seconds)
                    self.metrics.batch_tokens.inc(sum(job.tokens for job in batch))
                    self.metrics.batch_padded_tokens.inc(cost)
                results = await loop.run_in_executor(self._post_pool, self.runner.finish, prepared, outputs)
            except Exception as err:  # a bug in the engine: every request of the batch gets it
                log.exception("engine batch failed")
                results = [err] * len(batch)
            self._answer(batch, results)
        finally:
            self._in_flight -= 1
            self._check_idle()

    def _answer(self, batch: Sequence[Job], results: Sequence[Answer | Exception]) -> None:
        for job, result in zip(batch, results, strict=True):
            if job.future.done():
                continue
            if isinstance(result, Exception):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)

    def _observe_depth(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.set(self._admitted)
