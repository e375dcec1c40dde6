"""The batcher's workers: the tokenizer thread and `BatchRunner`'s three stages (prepare, forward, finish).

Prepare resolves each new request's task to its current version, pins every delta of the batch, then
loads the cold ones (pin first: loading one cold task can no longer evict another of the same batch),
re-tokenises where a new version truncates differently, and collates, pads and plans the modules and
PASTA (`Engine.prepare`); forward runs the engine; finish post-processes each request whose rows are all
done. Tokenisation runs in a thread of its own: a fast tokenizer keeps truncation settings as state, so it
must not be called from two threads at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch

from adapters_store.format import InvalidDelta
from adapters_store.store import DeltaStore, StoreCorrupt, TaskNotFound
from server.backbone import Backbone, EncodedText, TextInput
from server.batching.jobs import Answer, Item, Job, Outcome
from server.cache import DeltaCache
from server.delta import PreparedDelta, builtin_tasks, prepare_delta
from server.engine import Engine, Planned, Row
from server.postprocess import UnsupportedInput, predict_row

T = TypeVar("T")


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
        # Tasks that are not in the store: the bare backbone as an embedding model (never evicted).
        self.builtin: dict[str, PreparedDelta] = builtin_tasks(backbone, engine.backend.name)

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
        return Answer(job.task, delta.version, predictions, job.tokens)

    def _resolve_all(self, names: Sequence[str], pins: contextlib.ExitStack) -> dict[str, PreparedDelta | Exception]:
        """Each task's current version, every one pinned before any is loaded."""
        keys: dict[str, tuple[str, int] | Exception] = {}
        for name in names:
            if name in self.builtin:
                continue
            info = self.store.get_info(name)
            keys[name] = TaskNotFound(name) if info is None else (name, info.version)
        pins.enter_context(self.cache.pinned([k for k in keys.values() if not isinstance(k, Exception)]))
        resolved: dict[str, PreparedDelta | Exception] = {name: self.builtin[name] for name in names
                                                          if name in self.builtin}
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
