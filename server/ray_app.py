"""deltaserve on Ray Serve: N engine replicas behind Ray's HTTP proxy, with the same HTTP API.

Each replica runs the whole FastAPI application (`@serve.ingress` with a builder, so the app and
its backbone are made inside the replica, not pickled), with one change: its batcher is
`ServeBatcher`, Ray Serve's `@serve.batch` queue, which hands the engine worker lists of predict
requests for *any mix of tasks*; `BatchRunner` resolves each to its current version and runs them
in one forward. Requests are routed by the task in the path, not by Ray's multiplexed model ids
(which would split a batch by model). Replicas share an `S3DeltaStore`: an upload answered by one
is served by the others within `--store-poll-s` (see adapters_store/s3.py).

Start it with `deltaserve serve --ray --replicas 2 --store s3://bucket/prefix` (a local Ray
instance, or `--ray-address` to join one), or `serve run server.ray_app:app_builder store=s3://…`.
Ray's autoscaler scales between `--replicas` and `--max-replicas` on `--target-ongoing-requests`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI, Request, Response
from ray import serve

from server.app import create_app
from server.backbone import TextInput
from server.batching import Answer, BatchRunner, Job, ShuttingDown
from server.metrics import Metrics
from server.service import Server
from server.settings import Settings

log = logging.getLogger("deltaserve")

REPLICA_HEADER = "x-deltaserve-replica"


class ServeBatcher:
    """A `Batcher` (server.batching.jobs: `predict`, `submit`, `depth`, `start`, `stop_admitting`, `close`) on
    Ray Serve's `@serve.batch`; its batches are whole requests, first come first served (no fair share).

    One engine worker thread, as in `Batcher`: the engine is not thread-safe and the replica's
    event loop must stay free while a forward runs.
    """

    def __init__(self, runner: BatchRunner, metrics: Metrics, *, max_batch_size: int, wait_s: float) -> None:
        self._runner = runner
        self._metrics = metrics
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="deltaserve-engine")
        self._waiting = 0
        self._closing = False
        # Decorated per instance: a class-level @serve.batch would share one queue between instances.
        self._batched: Callable[[Job], Awaitable[Answer | Exception]] = serve.batch(
            max_batch_size=max_batch_size, batch_wait_timeout_s=wait_s)(self._run_batch)

    @property
    def depth(self) -> int:
        return self._waiting

    def start(self) -> None:
        """Nothing to start: `@serve.batch` makes its queue on first use."""

    def problem(self) -> str | None:
        """None: Ray Serve watches its replicas itself (health_check_period_s) and restarts a broken one."""
        return None

    async def predict(self, task: str, inputs: list[TextInput], max_length: int, tenant: str | None = None) -> Answer:
        """The routes' entry point, as `Batcher.predict`: tokenise in the tokenizer thread, then queue."""
        if self._closing:
            raise ShuttingDown()
        try:
            encoded = await self._runner.tokenizer.encode(inputs, max_length)
        except asyncio.CancelledError:  # the client left while it tokenised
            self._metrics.abandoned.inc()
            raise
        return await self.submit(Job(task, inputs, encoded, max_length, tenant=tenant))

    async def submit(self, job: Job) -> Answer:
        if self._closing:
            raise ShuttingDown()
        self._waiting += 1
        self._metrics.queue_depth.set(self._waiting)
        try:
            result = await self._batched(job)
        except asyncio.CancelledError:
            # The client left: Ray Serve's proxy cancels the replica's handling, as DisconnectMiddleware does on
            # the plain server, and @serve.batch leaves a cancelled request out of the batch it forms.
            self._metrics.abandoned.inc()
            raise
        finally:
            self._waiting -= 1
            self._metrics.queue_depth.set(self._waiting)
        if isinstance(result, Exception):  # this request's own failure (unknown task, bad input), not the batch's
            raise result
        return result

    def stop_admitting(self) -> None:
        self._closing = True

    async def close(self) -> None:
        self.stop_admitting()
        while self._waiting:
            await asyncio.sleep(0.01)
        self._worker.shutdown(wait=True)

    async def _run_batch(self, jobs: list[Job]) -> list[Answer | Exception]:
        started = time.perf_counter()
        try:
            results = await asyncio.get_running_loop().run_in_executor(self._worker, self._runner, jobs)
        except Exception as err:  # a bug in the engine: every request of the batch gets it
            log.exception("engine batch failed")
            results = [err] * len(jobs)
        self._metrics.batch_requests.observe(len(jobs))
        self._metrics.batch_rows.observe(sum(len(job.encoded) for job in jobs))
        self._metrics.batch_tasks.observe(len({job.task for job in jobs}))
        self._metrics.batch_seconds.observe(time.perf_counter() - started)
        return results


def replica_app(settings: Settings) -> FastAPI:
    """The FastAPI app of one replica: the usual one, with `@serve.batch` batching and its replica named."""
    replica = serve.get_replica_context().replica_id.unique_id

    def use_serve_batching(server: Server) -> None:
        server.batcher = ServeBatcher(server.runner, server.metrics, max_batch_size=settings.max_batch_requests,
                                      wait_s=settings.batch_wait_ms / 1000)
        server.replica = replica

    app = create_app(settings, on_build=use_serve_batching)

    @app.middleware("http")
    async def name_the_replica(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        response.headers[REPLICA_HEADER] = replica
        return response

    return app


# Settings that Ray Serve's replicas do not use: @serve.batch forms batches by count (no token budget), Ray's
# proxy queues in front of the replicas (--max-queue only caps each replica's requests in flight; no 429s
# from row or time budgets), and glibc's malloc tuning is set per process by `serve`, not in Ray's workers.
IGNORED_UNDER_RAY = ("max_batch_tokens", "max_queue_rows", "max_queue_s", "malloc_threshold", "malloc_trim_s")


def ignored_under_ray(settings: Settings) -> list[str]:
    """The flags given (flag, variable or config file) that --ray leaves unused: each named in a warning."""
    return ["--" + name.replace("_", "-") for name in IGNORED_UNDER_RAY
            if name in Settings.model_fields and name in settings.model_fields_set]


def deployment_options(settings: Settings) -> dict[str, Any]:
    """Ray Serve's options for the replicas: their number (or autoscaling range) and how much each takes in."""
    options: dict[str, Any] = {
        # Requests must reach the replica to be batched there: Ray's default (5) would starve @serve.batch.
        "max_ongoing_requests": settings.max_queue,
        "ray_actor_options": {"num_cpus": settings.ray_replica_cpus},
        "health_check_period_s": 5,
        "graceful_shutdown_timeout_s": settings.shutdown_grace_s,
    }
    if settings.max_replicas and settings.max_replicas > settings.replicas:
        options["autoscaling_config"] = {"min_replicas": settings.replicas, "initial_replicas": settings.replicas,
                                         "max_replicas": settings.max_replicas,
                                         "target_ongoing_requests": settings.target_ongoing_requests}
    else:
        options["num_replicas"] = settings.replicas
    return options


def application(settings: Settings) -> serve.Application:
    """The Ray Serve application for these settings (replicas, autoscaling, store, batching)."""
    values = settings.model_dump(mode="json", exclude_none=True)

    def build_app() -> FastAPI:  # runs inside each replica: the backbone is loaded there
        return replica_app(Settings(**values))

    @serve.deployment(name="deltaserve", **deployment_options(settings))
    @serve.ingress(build_app)
    class DeltaServeReplica:
        """One engine replica; everything it does is the FastAPI app built by `build_app`."""

    return DeltaServeReplica.bind()


def app_builder(args: dict[str, str]) -> serve.Application:
    """For `serve run server.ray_app:app_builder store=s3://… replicas=2` (and Serve config files)."""
    return application(Settings(**args))


def check_store_is_shared(settings: Settings) -> None:
    if (settings.replicas > 1 or (settings.max_replicas or 0) > 1) and not settings.store.startswith("s3://"):
        raise SystemExit("several replicas need one store they all see: --store s3://bucket/prefix "
                         f"(a folder, {settings.store}, is seen by one process)")


def run(settings: Settings, log_level: str = "info") -> int:
    """`deltaserve serve --ray`: Ray Serve's HTTP proxy on --host/--port, replicas behind it, until SIGTERM/Ctrl-C."""
    import signal
    import threading

    import ray

    check_store_is_shared(settings)
    for flag in ignored_under_ray(settings):
        log.warning("%s has no effect with --ray (Ray Serve batches by count and queues in its proxy)", flag)
    ray.init(address=settings.ray_address, include_dashboard=False, logging_level=log_level.upper())
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(application(settings), name="deltaserve", route_prefix="/", blocking=False)
    log.info("deltaserve on Ray Serve: http://%s:%d, %d replicas", settings.host, settings.port, settings.replicas)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()  # replicas finish what they accepted (graceful_shutdown_timeout_s)
    ray.shutdown()
    return 0
