"""Prometheus metrics of one server instance, in its own registry (several apps may live in one process).

Requests by route, method, task and status, latency; where a predict request's time goes, stage by
stage (tokenising, waiting in the queue, the engine's forwards, post-processing: TEI's breakdown), how
many requests and rows each engine forward merged, the queue depth, the delta cache read at scrape
time, and, as in the default registry, the process (resident memory, CPU, open files) and Python's
garbage collector, plus a build-info gauge naming the release and what it runs on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

# The `_created` series double every counter's output and no dashboard of ours reads them.
disable_created_metrics()

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
# The stages of one predict request start far below a millisecond (tokenising a short text).
STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, *LATENCY_BUCKETS)
STAGES = ("tokenize", "queue", "inference", "postprocess")
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class _CacheCollector(Collector):
    def __init__(self, stats: Callable[[], Mapping[str, int]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        stats = self._stats()
        for key in ("hits", "misses", "evictions"):
            yield CounterMetricFamily(f"deltaserve_cache_{key}", f"delta cache {key}", value=stats.get(key, 0))
        yield GaugeMetricFamily("deltaserve_cache_resident_bytes", "bytes of prepared deltas held on the device",
                                value=stats.get("resident_bytes", 0))
        yield GaugeMetricFamily("deltaserve_cache_entries", "prepared deltas held on the device",
                                value=stats.get("entries", 0))


class Metrics:
    CONTENT_TYPE = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # The process and the garbage collector, which a private registry lacks unless registered (the soak
        # watches process_resident_memory_bytes); the module's instances read this process's /proc.
        for collector in (PROCESS_COLLECTOR, GC_COLLECTOR, PLATFORM_COLLECTOR):
            r.register(collector)
        self.build_info = Gauge("deltaserve_build_info", "always 1; the labels name the release and what it runs on",
                                ["version", "python", "torch", "backend", "device", "dtype"], registry=r)
        self.requests = Counter("deltaserve_requests", "HTTP requests answered",
                                ["route", "method", "task", "status"], registry=r)
        self.latency = Histogram("deltaserve_request_seconds", "HTTP request latency", ["route", "method"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        # Per predict request, summed over its rows' batches: where its time went.
        self.stage_seconds = {
            stage: Histogram(f"deltaserve_{stage}_seconds", text, buckets=STAGE_BUCKETS, registry=r)
            for stage, text in (
                ("tokenize", "a predict request's tokenising, waiting for the tokenizer thread included"),
                ("queue", "a predict request's wait from being queued (tokenised) until its first row is in a batch"),
                ("inference", "the engine forwards that ran a predict request's rows (seconds of each batch)"),
                ("postprocess", "the post-processing (softmax, words, entities) of the batches of a predict request"),
            )}
        self.batch_requests = Histogram("deltaserve_batch_requests", "requests merged into one engine forward",
                                        buckets=SIZE_BUCKETS, registry=r)
        self.batch_rows = Histogram("deltaserve_batch_rows", "inputs (rows) in one engine forward",
                                    buckets=SIZE_BUCKETS, registry=r)
        self.batch_tasks = Histogram("deltaserve_batch_tasks", "distinct tasks in one engine forward",
                                     buckets=SIZE_BUCKETS, registry=r)
        self.batch_seconds = Histogram("deltaserve_batch_seconds", "time of one batch in the engine worker",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.batch_tokens = Counter("deltaserve_batch_tokens", "tokens of the inputs run by the engine", registry=r)
        self.batch_padded_tokens = Counter("deltaserve_batch_padded_tokens",
                                           "tokens the engine computed: each forward's longest input × its rows",
                                           registry=r)
        self.queue_depth = Gauge("deltaserve_queue_depth", "predict requests waiting for the engine", registry=r)
        self.rejected = Counter("deltaserve_rejected", "predict requests refused because the queue was full",
                                registry=r)
        self.queue_rows = Gauge("deltaserve_queue_rows", "rows (inputs, windows of long texts) of the predict "
                                "requests waiting", registry=r)
        self.abandoned = Counter("deltaserve_abandoned", "predict requests whose client went away while their "
                                 "rows waited (the rows were dropped before the engine)", registry=r)
        self.tasks = Gauge("deltaserve_tasks", "tasks in the store", registry=r)

    def watch_cache(self, stats: Callable[[], Mapping[str, int]]) -> None:
        self.registry.register(_CacheCollector(stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)
