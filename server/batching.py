"""Cross-request batching: predict requests for any mix of tasks answered by one engine forward.

`Batcher` owns a bounded queue on the event loop. Its loop takes the oldest request, waits a
short window (a few ms) for more, and closes the batch at `max_batch_requests` requests or
`max_batch_tokens` tokens; the batch then runs in the single engine worker thread (the
engine is not thread-safe, and the event loop must stay free). While one batch runs, the
next one gathers. A full queue refuses at once (`Overloaded` -> 429 + Retry-After).

`BatchRunner` is what runs in the worker: it resolves each task to its *current* version
when the batch is formed (so a replace is never mixed into one request), loads it through
the device cache, pins the batch's deltas, runs one forward, and post-processes each row.

Tokenisation runs in a thread of its own: a fast tokenizer keeps truncation settings as
state, so it must not be called from two threads at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

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

    @property
    def tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.encoded)


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


class BatchRunner:
    """Runs one batch of jobs in the engine worker: resolve, pin, forward, post-process."""

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
        resolved: dict[str, PreparedDelta | Exception] = {}
        for job in jobs:
            if job.task not in resolved:
                resolved[job.task] = self._resolve(job.task)
        ready = [d for d in resolved.values() if not isinstance(d, Exception)]
        results: list[Answer | Exception] = []
        with self.cache.pinned([d.key for d in ready]):
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
            outputs = self.engine.forward(rows)
        for job, (start, encoded) in zip(jobs, spans, strict=True):
            delta = resolved[job.task]
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

    def _resolve(self, name: str) -> PreparedDelta | Exception:
        for _ in range(3):
            info = self.store.get_info(name)
            if info is None:
                return TaskNotFound(name)
            version = info.version

            def load(version: int = version) -> PreparedDelta:
                return prepare_delta(self.store.read_bytes(name, version), self.backbone, name, version)

            try:
                return self.cache.get((name, version), load)
            except TaskNotFound:
                continue  # replaced between reading the manifest and the file: take the newer one
            except (InvalidDelta, StoreCorrupt) as err:  # fails this task's requests, not the batch
                return err
        return TaskNotFound(name)


class Batcher:
    def __init__(
        self,
        run: Callable[[list[Job]], list[Answer | Exception]],
        *,
        max_batch_tokens: int,
        max_batch_requests: int,
        wait_s: float,
        max_queue: int,
        metrics: Metrics | None = None,
    ) -> None:
        self._run = run
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_requests = max_batch_requests
        self.wait_s = wait_s
        self.max_queue = max_queue
        self.metrics = metrics
        self._pending: deque[Job] = deque()
        self._arrived = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="deltaserve-engine")
        self._loop_task: asyncio.Task[None] | None = None
        self._closing = False
        self._batch_seconds = 0.05  # running mean, for Retry-After

    @property
    def depth(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._loop(), name="deltaserve-batcher")

    async def submit(self, job: Job) -> Answer:
        if self._closing:
            raise ShuttingDown()
        if len(self._pending) >= self.max_queue:
            if self.metrics:
                self.metrics.rejected.inc()
            raise Overloaded(self.retry_after())
        self._pending.append(job)
        self._idle.clear()
        self._arrived.set()
        self._observe_depth()
        return await job.future  # a client that goes away cancels the future; the loop skips it

    def retry_after(self) -> int:
        batches_ahead = len(self._pending) / self.max_batch_requests + 1
        return max(1, math.ceil(batches_ahead * self._batch_seconds))

    async def close(self) -> None:
        """Refuse new work, finish everything accepted, stop the loop and the worker."""
        self._closing = True
        if self._loop_task is not None and not self._loop_task.done():
            await self._idle.wait()
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        self._worker.shutdown(wait=True)

    # ------------------------------------------------------------------ internals

    async def _loop(self) -> None:
        while True:
            if not self._pending:
                self._idle.set()
                self._arrived.clear()
                await self._arrived.wait()
            batch = await self._gather()
            if batch:
                await self._execute(batch)

    async def _gather(self) -> list[Job]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        batch: list[Job] = []
        tokens = 0
        while len(batch) < self.max_batch_requests:
            if not self._pending:
                remaining = deadline - loop.time()
                if remaining <= 0 or self._closing:
                    break
                self._arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                continue
            job = self._pending[0]
            if job.future.done():  # cancelled by a client that went away
                self._pending.popleft()
                continue
            if batch and tokens + job.tokens > self.max_batch_tokens:
                break  # it opens the next batch; a single job larger than the limit runs alone
            batch.append(self._pending.popleft())
            tokens += job.tokens
        self._observe_depth()
        return batch

    async def _execute(self, batch: list[Job]) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            results: list[Answer | Exception] = await loop.run_in_executor(self._worker, self._run, batch)
        except Exception as err:  # a bug in the engine: every request of the batch gets it
            log.exception("engine batch failed")
            results = [err] * len(batch)
        seconds = time.perf_counter() - started
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * seconds
        if self.metrics:
            self.metrics.batch_requests.observe(len(batch))
            self.metrics.batch_rows.observe(sum(len(job.encoded) for job in batch))
            self.metrics.batch_tasks.observe(len({job.task for job in batch}))
            self.metrics.batch_seconds.observe(seconds)
        for job, result in zip(batch, results, strict=True):
            if job.future.done():
                continue
            if isinstance(result, Exception):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)

    def _observe_depth(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.set(len(self._pending))
