"""Length-aware batch formation (no starvation, padded-token budget) and pin-before-load."""

from __future__ import annotations

import asyncio
import random

import pytest
from delta_builders import build_delta
from http_helpers import assert_close, engine_answer
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters_store.local import LocalDeltaStore
from server.backbone import EncodedText
from server.batching import BatchRunner, Job, Tokenizer, form_batch, padded_tokens
from server.cache import DeltaCache
from server.delta import prepare_delta
from server.engine import Engine


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def job(loop, lengths: list[int], task: str = "t") -> Job:
    encoded = [EncodedText([101] * n, None, [(0, 0)] * n, [None] * n, [None] * n) for n in lengths]
    return Job(task, ["x"] * len(lengths), encoded, 128, future=loop.create_future())


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.lists(st.lists(st.integers(1, 80), min_size=1, max_size=4), min_size=1, max_size=40),
       st.integers(16, 2048), st.integers(1, 16))
def test_oldest_always_in_and_padded_budget_respected(loop, shapes, budget, max_rows):
    waiting = [job(loop, lengths) for lengths in shapes]  # whole jobs: several rows each
    rows = [item for j in waiting for item in j.items()]  # and the same as single rows
    for parts in (waiting, rows):
        batch = form_batch(parts, budget, max_rows)
        assert batch[0] is parts[0]  # the oldest, and the batch in arrival order
        assert [parts.index(j) for j in batch] == sorted(parts.index(j) for j in batch)
        assert len({id(j) for j in batch}) == len(batch)
        if len(batch) > 1:  # an oldest over the budget alone runs alone; else the limits hold
            assert padded_tokens(batch) <= budget
            assert sum(p.rows for p in batch) <= max_rows
        # Not lazy: when everything waiting fits, everything goes.
        if sum(p.rows for p in parts) <= max_rows and padded_tokens(parts) <= budget:
            assert len(batch) == len(parts)


def test_short_and_long_requests_are_not_mixed(loop):
    """Alternating 6- and 60-token requests: FIFO batches pad half the tokens, these almost none."""
    waiting = [job(loop, [6 if i % 2 else 60]) for i in range(32)]
    batches = []
    while waiting:
        batch = form_batch(waiting, 8 * 60, 16)
        batches.append(batch)
        waiting = [j for j in waiting if j not in batch]
    assert all(len({j.longest for j in b}) == 1 for b in batches), [[j.longest for j in b] for b in batches]
    fifo = [[job(loop, [6 if i % 2 else 60]) for i in range(s, s + 8)] for s in range(0, 32, 8)]
    used = sum(j.tokens for b in batches for j in b)
    assert used / sum(padded_tokens(b) for b in batches) == 1.0
    assert used / sum(padded_tokens(b) for b in fifo) < 0.6


def test_a_long_request_is_not_starved_by_a_stream_of_short_ones(loop):
    """Short requests keep arriving and would always fit better; the long one waits one batch at most
    once it is the oldest."""
    rng = random.Random(0)
    long_one = job(loop, [120, 120])
    waiting = [job(loop, [rng.randint(4, 12)]) for _ in range(10)] + [long_one]
    served_in = None
    for step in range(40):
        batch = form_batch(waiting, 256, 8)
        waiting = [j for j in waiting if j not in batch] + [job(loop, [rng.randint(4, 12)]) for _ in range(8)]
        if long_one in batch:
            served_in = step
            break
        assert long_one in waiting
    # 10 short ones were ahead of it (batches of 8): served by the third batch at worst
    assert served_in is not None and served_in <= 2


def test_every_delta_of_a_batch_is_pinned_before_any_is_loaded(tiny_backbone, tmp_path):
    """A cache with room for one delta, a batch with two cold tasks: loading the second must not evict
    the first (today's pin-after-load did), so both are resident when the forward runs."""
    store = LocalDeltaStore(tmp_path, tiny_backbone.spec())
    for i, name in enumerate(("a", "b")):
        store.put(name, build_delta(tiny_backbone, parts=("keep", "lora"), seed=i))
    one = prepare_delta(store.read_bytes("a", 1), tiny_backbone, "a", 1).nbytes
    cache = DeltaCache(one + one // 2)
    tokenizer = Tokenizer(tiny_backbone)
    engine = Engine(tiny_backbone)
    runner = BatchRunner(tiny_backbone, engine, cache, store, tokenizer, 32)
    seen = {}
    run = engine.run

    def watched(planned):
        seen["resident"] = [("a", 1) in cache, ("b", 1) in cache]
        seen["evictions"] = cache.stats()["evictions"]
        return run(planned)

    engine.run = watched
    loop = asyncio.new_event_loop()
    try:
        jobs = [Job(task, ["a film"], tiny_backbone.encode(["a film"], 32), 32, future=loop.create_future())
                for task in ("a", "b")]
        answers = runner(jobs)
    finally:
        loop.close()
        tokenizer.close()
    assert [a.task for a in answers] == ["a", "b"]
    assert seen == {"resident": [True, True], "evictions": 0}
    assert cache.stats()["evictions"] == 1  # the budget is restored once the batch lets go


def test_rows_of_one_request_in_two_forwards_are_answered_by_one_version(tiny_backbone, tmp_path):
    """Length-aware formation may run a request's rows in different forwards; a replace landing between
    them must not mix versions: the version resolved at its first forward answers every row."""
    store = LocalDeltaStore(tmp_path, tiny_backbone.spec())
    old = build_delta(tiny_backbone, parts=("keep", "lora"), seed=1)
    store.put("t", old)
    tokenizer = Tokenizer(tiny_backbone)
    runner = BatchRunner(tiny_backbone, Engine(tiny_backbone), DeltaCache(1 << 30), store, tokenizer, 32)
    texts = ["a short one", "a much longer review of a film that goes on and on about nothing at all"]
    expected = engine_answer(tiny_backbone, old, texts, 32)
    loop = asyncio.new_event_loop()
    try:
        request = Job("t", texts, tiny_backbone.encode(texts, 32), 32, future=loop.create_future())
        first, second = request.items()

        def run(items):
            prepared = runner.prepare(items)
            return runner.finish(prepared, runner.forward(prepared))

        assert run([first]) == []  # not complete yet
        store.put("t", build_delta(tiny_backbone, parts=("pasta",), method="pasta", seed=2))
        ((job, answer),) = run([second])
    finally:
        loop.close()
        tokenizer.close()
    assert job is request and answer.version == 1
    assert_close(answer.predictions, expected)


def test_both_batchers_are_batchers(tiny_backbone, tmp_path):
    """`PipelineBatcher` and Ray Serve's `ServeBatcher` implement the one `Batcher` protocol the service uses."""
    from server.batching import Batcher, PipelineBatcher

    store = LocalDeltaStore(tmp_path / "store", tiny_backbone.spec())
    tokenizer = Tokenizer(tiny_backbone)
    runner = BatchRunner(tiny_backbone, Engine(tiny_backbone), DeltaCache(1 << 20), store, tokenizer, 32)
    assert isinstance(PipelineBatcher(runner, max_batch_tokens=64, max_batch_requests=4, wait_s=0, max_queue=4),
                      Batcher)
    pytest.importorskip("ray")
    from server.metrics import Metrics
    from server.ray_app import ServeBatcher

    assert isinstance(ServeBatcher(runner, Metrics(), max_batch_size=4, wait_s=0), Batcher)
    tokenizer.close()
