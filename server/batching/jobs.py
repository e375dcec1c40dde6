"""What flows through a batcher (`Job`s of rows, `Item`s, `Answer`s), what it may refuse with, and what a
batcher is (`Batcher`): the protocol the routes rely on, which `PipelineBatcher` (server.batching.pipeline)
and Ray Serve's `ServeBatcher` (server.ray_app) implement.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from server.backbone import EncodedText, TextInput
from server.delta import PreparedDelta
from server.postprocess import Prediction


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
    tokens: int = 0  # tokens the rows ran with (special tokens included): the embeddings API's usage


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
    tenant: str | None = None  # whose request (with --tenants-file): fair share and admission per tenant
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

    @property
    def tenant(self) -> str | None:
        return self.job.tenant


Outcome = tuple[Job, "Answer | Exception"]


@runtime_checkable
class Batcher(Protocol):
    """What the service asks of a batcher: admit and answer predict requests, report its depth, start,
    stop admitting, and close after finishing what it accepted."""

    @property
    def depth(self) -> int:
        """Requests admitted and not yet in a batch."""
        ...

    def start(self) -> None:
        """Start serving (on the running event loop)."""
        ...

    async def predict(self, task: str, inputs: list[TextInput], max_length: int, tenant: str | None = None) -> Answer:
        """Admit (or refuse at once: `Overloaded`, `ShuttingDown`), tokenise, queue, answer."""
        ...

    async def submit(self, job: Job) -> Answer:
        """Queue an already tokenised job (the windows of long texts), admitted as `predict` is."""
        ...

    def stop_admitting(self) -> None:
        """Refuse every new request from now on (`ShuttingDown`); what was admitted still runs."""
        ...

    def problem(self) -> str | None:
        """Why it cannot answer now (its loop died), or None: the readiness probes answer 503 with it."""
        ...

    async def close(self) -> None:
        """Stop admitting, finish everything accepted, release the workers."""
        ...
