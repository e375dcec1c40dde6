"""The pipeline batcher: admission, the queue of rows, when to form a batch, and the stages around the engine.

Admission first: `PipelineBatcher.predict` refuses at once (`Overloaded` -> 429) when what already waits
is too much — counted from admission, so a refusal costs no tokenising and no wait. What waits is
counted in rows (inputs, or windows of long texts), as the engine's cost is: a request is refused
when `max_queue` requests wait, or its rows would take the rows waiting past `max_queue_rows`, or
past `max_queue_s` seconds of the engine's measured rate; so one client's 64-text requests cannot
queue minutes of work in front of everyone, and what was admitted drains within a shutdown's
grace. A request finds room when nothing waits, however large. Retry-After is the measured time
to drain what waits (rows waiting ÷ the engine's measured rows per second), not a constant.

With tenants (`--tenants-file`), the engine is shared among them by weight: `FairShare`
(server.batching.formation) forms the batches, and admission is per tenant: each may hold its
weight's share (among the tenants with work admitted) of every bound above, so a tenant alone has
the whole queue, and a flooding one gets 429 with its own Retry-After (its rows ÷ its share of the
rate) while the others are admitted. Without tenants nothing of this runs.

A request whose client went away (the HTTP layer cancels its handler, see
server.api.middleware.DisconnectMiddleware) has its rows taken out of the queue at once: they
never reach the engine, and they stop counting against admission.

The batcher is a pipeline of single-thread stages, as TEI's is, so the engine never waits on
Python work that does not need it:

    event loop:  admit, tokenise (tokenizer thread), queue, form the next batch (server.batching.formation)
    prepare:     resolve, pin and load the batch's deltas; collate, pad, plan (`BatchRunner.prepare`)
    engine:      one forward (the engine is not thread-safe: one forward at a time), unpin
    post:        softmax, words and entities of each request whose rows are all done

The next batch is formed as late as it can still be prepared before the engine is free (from
the measured seconds per padded token), so rows arriving meanwhile join it; at most one batch
waits prepared.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from server.backbone import TextInput
from server.batching.formation import FairShare, form_batch, padded_tokens
from server.batching.jobs import Answer, Item, Job, Outcome, Overloaded, ShuttingDown
from server.batching.runner import Prepared, Runner
from server.metrics import Metrics

log = logging.getLogger(__name__)


class PipelineBatcher:
    """The server's batcher: admission, the queue of rows, formation and the pipeline of stages (module docstring)."""

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
        weights: Callable[[str | None], float] | None = None,
    ) -> None:
        """`weights` (tenants' weights, with --tenants-file) turns on the fair share: `FairShare` forms the
        batches, and admission bounds each tenant's part of the queue (module docstring)."""
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
        self._fair = FairShare(weights) if weights is not None else None
        self._tenants: dict[str | None, list[int]] = {}  # tenant -> [requests admitted, their rows], as above
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

    def problem(self) -> str | None:
        """The batching loop ended while the server runs (a bug): nothing would reach the engine any more."""
        task = self._loop_task
        if task is None or not task.done() or self._closing:
            return None
        error = task.exception() if not task.cancelled() else None
        return f"the batcher has stopped ({type(error).__name__}: {error})" if error else "the batcher has stopped"

    async def predict(self, task: str, inputs: list[TextInput], max_length: int, tenant: str | None = None) -> Answer:
        """Admit (or refuse at once), tokenise, queue, and wait for the answer."""
        self._admit(len(inputs), tenant)
        began = time.perf_counter()
        try:
            encoded = await self.runner.tokenizer.encode(inputs, max_length)
        except BaseException as err:
            self._leave(1, len(inputs), tenant)
            if isinstance(err, asyncio.CancelledError) and self.metrics:  # the client left while it tokenised
                self.metrics.abandoned.inc()
            raise
        self._count(0, len(encoded) - len(inputs), tenant)
        job = Job(task, inputs, encoded, max_length, tenant=tenant)
        job.stage_seconds["tokenize"] = time.perf_counter() - began
        return await self._enqueue(job)

    async def submit(self, job: Job) -> Answer:
        """Queue an already tokenised job (admission as for `predict`)."""
        self._admit(job.rows, job.tenant)
        return await self._enqueue(job)

    def retry_after(self, rows: int | None = None, share: float = 1.0) -> int:
        """Seconds until `rows` (default: all that wait now) have drained, at the engine's measured rate (or at
        `share` of it: a tenant's)."""
        if not self._rows_per_s:
            return 1
        waiting = self._waiting_rows if rows is None else rows
        return max(1, math.ceil((waiting + 1) / (self._rows_per_s * share)))

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

    def _admit(self, rows: int, tenant: str | None) -> None:
        if self._closing:
            raise ShuttingDown()
        if self._fair is None:
            if self._admitted and self._queue_full(self._admitted, self._waiting_rows, rows):
                self._refuse(self.retry_after())
        else:
            # Each tenant within its share of every bound, by weight among the tenants with work admitted:
            # alone, a tenant has the whole queue; a flooding one is refused, with its own Retry-After,
            # while the others are admitted (the queue may then pass a bound by their shares).
            admitted, waiting = self._tenants.get(tenant, (0, 0))
            share = self._share(tenant)
            if admitted and self._queue_full(admitted, waiting, rows, share):
                self._refuse(self.retry_after(waiting, share))
        self._count(1, rows, tenant)
        self._idle.clear()

    def _refuse(self, retry_after: int) -> None:
        if self.metrics:
            self.metrics.rejected.inc()
        raise Overloaded(retry_after)

    def _share(self, tenant: str | None) -> float:
        """`tenant`'s part of the queue: its weight over the weights of every tenant with work admitted."""
        assert self._fair is not None
        weight = self._fair.weight
        others = sum(weight(t) for t, (admitted, _) in self._tenants.items() if admitted and t != tenant)
        return weight(tenant) / (weight(tenant) + others)

    def _queue_full(self, admitted: int, waiting_rows: int, rows: int, share: float = 1.0) -> bool:
        """Whether admitting `rows` more to what waits (`admitted` requests, `waiting_rows` rows) would pass
        `share` of a bound of the queue (requests, rows, seconds of work)."""
        after = waiting_rows + rows
        drain = self.drain_seconds(after)
        return (admitted >= self.max_queue * share
                or (self.max_queue_rows is not None and after > self.max_queue_rows * share)
                or (self.max_queue_s is not None and drain is not None and drain > self.max_queue_s * share))

    def _count(self, jobs: int, rows: int, tenant: str | None) -> None:
        """`jobs` requests and `rows` rows more (fewer, when negative) waiting, in all and for `tenant`."""
        self._admitted += jobs
        self._waiting_rows += rows
        if self._fair is not None:
            counts = self._tenants.setdefault(tenant, [0, 0])
            counts[0] += jobs
            counts[1] += rows
            if counts == [0, 0]:
                del self._tenants[tenant]
        self._observe_depth()

    def _leave(self, jobs: int, rows: int, tenant: str | None) -> None:
        self._count(-jobs, -rows, tenant)
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
        self._leave(1, job.queued, job.tenant)
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
        form = self._fair.form if self._fair is not None else form_batch
        batch = form(self._pending, self.max_batch_tokens, self.max_batch_rows)
        now = time.perf_counter()
        for item in batch:
            item.job.stage_seconds.setdefault("queue", now - item.job.enqueued_at)
        chosen = {id(i) for i in batch}
        self._pending = [i for i in self._pending if id(i) not in chosen]
        left: dict[str | None, list[int]] = {}  # tenant -> [requests with no row left waiting, rows taken]
        for item in batch:
            item.job.queued -= 1
            counts = left.setdefault(item.job.tenant, [0, 0])
            counts[0] += item.job.queued == 0
            counts[1] += 1
        for tenant, (jobs, rows) in left.items():
            self._count(-jobs, -rows, tenant)
        self._check_idle()
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
