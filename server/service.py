"""The service behind the HTTP layer: its parts built from the settings, the demo tasks, the memory report.

`Server.build` makes the heavy parts (backbone, store, cache, tokenizer, engine, batcher) once at
startup; `Server.close` finishes every request the batcher accepted before letting go. Nothing
here knows about HTTP, so the CLI, the routes and the tests share one way to make a server.
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adapters_store import open_store
from adapters_store.format import BackboneMismatch, InvalidDelta
from adapters_store.store import (
    DeltaStore,
    InvalidTaskName,
    NameTaken,
    Quota,
    TaskInfo,
    check_name,
    check_owner,
    owned_info,
)
from server.audit import AuditLog
from server.backbone import Backbone, check_text
from server.backends import serving_dtype
from server.backends.choice import start_engine
from server.backends.selfcheck import BackendChoice
from server.batching import Answer, Batcher, BatchRunner, Job, PipelineBatcher, TextInput, Tokenizer
from server.cache import DeltaCache
from server.delta import prepare_delta
from server.engine import Row
from server.extras import check_settings, package_version
from server.metrics import Metrics
from server.postprocess import UnsupportedInput
from server.settings import Settings
from server.tenants import OPERATOR, Caller, TenantsFile
from server.windows import aligned, count_windows, encode_windows, merge_windows

log = logging.getLogger("deltaserve")


class TooManyInputs(ValueError):
    """More inputs in one request than `max_inputs`, or more windows than `max_windows` (413)."""


def check_inputs(inputs: list[TextInput], max_chars: int) -> None:
    """Before any tokenising (the tokenizer reads a text whole, however much truncation keeps):
    `TooManyInputs` (413) for a text over `max_chars`, `InvalidText` (422) for a lone surrogate."""
    for i, item in enumerate(inputs):
        for j, text in enumerate((item,) if isinstance(item, str) else item):
            where = f"inputs[{i}]" + ("" if isinstance(item, str) else f"[{j}]")
            if len(text) > max_chars:
                raise TooManyInputs(f"{where} has {len(text)} characters; the limit is {max_chars}")
            check_text(text, where)


class StoreNotWritable(RuntimeError):
    """The store folder cannot be written by the server's user: said with the fix, at start."""


class Loading(RuntimeError):
    """The service is still being built (the backbone loading): 503 with Retry-After, until it is ready."""

    def __init__(self) -> None:
        super().__init__("the server is still loading its backbone and store; try again shortly")


# What `Server.check_forward` runs an upload on: ordinary English, long enough to fill any max_length.
TRIAL_TEXT = " ".join(["The quick brown fox jumps over the lazy dog, and the dog sleeps on in the sun."] * 40)


class Replaced(RuntimeError):
    """The task was replaced, again and again, while a windowed request waited (409: try again)."""


@dataclass
class Server:
    settings: Settings
    backbone: Backbone
    store: DeltaStore
    cache: DeltaCache
    tokenizer: Tokenizer
    runner: BatchRunner
    batcher: Batcher
    metrics: Metrics
    tenants: TenantsFile | None = None  # --tenants-file: who owns and may use which tasks
    audit: AuditLog = field(default_factory=lambda: AuditLog(None))
    replica: str | None = None  # set by a Ray Serve replica (server/ray_app.py): /memory names it
    draining: bool = False  # a stop was asked for: new work is refused with 503, readiness is down
    backend: BackendChoice | None = None  # which engine backend serves, and why (/health, /memory)

    @classmethod
    def build(cls, settings: Settings, backbone: Backbone | None = None) -> Server:
        check_settings(settings)  # a missing optional package named with its extra, before anything loads
        if settings.threads:
            torch.set_num_threads(settings.threads)
        if backbone is None:
            device = torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
            dtype = serving_dtype(device, None if settings.dtype == "auto" else getattr(torch, settings.dtype))
            backbone = Backbone.load(settings.backbone, device=device, dtype=dtype,
                                     max_length=settings.max_length, backend=settings.backend)
        store = open_settings_store(settings, backbone)
        seed_demo(store, settings)
        for info in store.list():
            if info.backbone_fingerprint != backbone.fingerprint:
                log.warning("task %s was made for backbone %s, not this one (%s): it will answer 409",
                            info.name, info.backbone_fingerprint, backbone.fingerprint)
        cache = DeltaCache(settings.cache_bytes)
        # Another replica replaced or deleted tasks: their entries are dead weight.
        store.on_change(lambda names: [cache.discard_task(name) for name in names])
        metrics = Metrics()
        metrics.watch_cache(cache.stats)
        engine, backend = start_engine(backbone, settings.backend)  # on CUDA: Triton checked, or the torch path
        metrics.build_info.labels(package_version(), platform.python_version(), torch.__version__, backbone.backend,
                                  backbone.device.type, str(backbone.dtype).removeprefix("torch.")).set(1)
        tokenizer = Tokenizer(backbone)
        tenants = TenantsFile(settings.tenants_file) if settings.tenants_file is not None else None
        if tenants is not None:
            tenants.start_watching()
            if settings.admin_token is None:
                log.warning("tenants without an admin token: /metrics and the tasks of no tenant are out of reach")
        runner = BatchRunner(backbone, engine, cache, store, tokenizer, settings.max_length)
        batcher = PipelineBatcher(runner, max_batch_tokens=settings.max_batch_tokens,
                                  max_batch_requests=settings.max_batch_requests,
                                  wait_s=settings.batch_wait_ms / 1000, max_queue=settings.max_queue,
                                  max_queue_rows=settings.max_queue_rows, max_queue_s=queue_seconds(settings),
                                  metrics=metrics, weights=tenants.weight if tenants is not None else None)
        return cls(settings, backbone, store, cache, tokenizer, runner, batcher, metrics, tenants,
                   AuditLog(settings.audit_log), backend=backend)

    def not_ready(self) -> str | None:
        """Why this server should get no new work now, or None: draining, the batcher stopped, or the store
        unreachable (the S3 bucket) or unusable (the folder gone). `/health` and `/v2/health/ready` answer
        503 with it, so that a load balancer sends elsewhere."""
        if self.draining:
            return "shutting down"
        return self.batcher.problem() or self.store.problem()

    def drain(self) -> None:
        """Begin a graceful stop (the signal handler calls it): refuse new predicts at once (503 with
        Retry-After), report not ready, and let what was admitted finish."""
        self.draining = True
        self.batcher.stop_admitting()

    async def close(self) -> None:
        self.draining = True
        await self.batcher.close()
        self.tokenizer.close()
        self.store.close()  # the S3 store's watcher thread
        if self.tenants is not None:
            self.tenants.close()
        self.audit.close()

    def task(self, name: str, caller: Caller = OPERATOR) -> TaskInfo:
        """The task's info if `caller` may see it; `InvalidTaskName` or `TaskNotFound` (also for another
        tenant's task: as if absent) otherwise."""
        check_name(name)
        return owned_info(self.store.get_info(name), name, caller.owner)

    def tasks(self, caller: Caller = OPERATOR) -> list[TaskInfo]:
        """The tasks `caller` may see: a tenant's own, or all."""
        return [info for info in self.store.list() if caller.owner is None or info.owner == caller.owner]

    def check_put(self, name: str, caller: Caller = OPERATOR, route: str = "PUT /tasks/{name}") -> None:
        """`NameTaken` (audited) before an upload is read, when the name is another's (the store checks again,
        atomically with the write)."""
        try:
            check_owner(self.store.get_info(name), name, caller.owner)
        except NameTaken as err:
            self.audit.record(caller, route, _refusal(err), name)
            raise

    async def put_task(self, name: str, data: bytes, caller: Caller = OPERATOR,
                       route: str = "PUT /tasks/{name}") -> tuple[TaskInfo, bool]:
        """Store a new version as `caller` (a tenant within its quotas, never over another's name), drop the
        replaced versions' prepared deltas, update the gauge, and audit the outcome."""
        quota = self._tenant_quota(caller)
        try:
            await asyncio.to_thread(self.check_forward, name, data)
            info, created = await asyncio.to_thread(self.store.put, name, data, caller.owner, quota)
        except Exception as err:
            self.audit.record(caller, route, _refusal(err), name)
            raise
        self.cache.discard_task(name)  # old versions will never be asked for again
        self.metrics.tasks.set(len(self.store.list()))
        self.audit.record(caller, route, "created" if created else "replaced", name, info.version)
        return info, created

    def check_forward(self, name: str, data: bytes) -> None:
        """Run the delta once on a full-length trial text, on this server's engine, before it is stored:
        `InvalidDelta` (422) when its output is not finite.

        Every value within ±65504 (and B·A too, `adapters_store.format`) does not bound what the forward
        computes: a delta that overflows it answered every predict 422 once stored. The trial shares the
        engine's lock with the batcher (one forward at a time); validation errors raise as the store's.
        """
        delta = prepare_delta(data, self.backbone, name, 0)
        max_length = self.runner.max_length(delta.meta.max_length)
        (probe,) = self.tokenizer.encode_blocking([TRIAL_TEXT], max_length)
        (output,) = self.runner.engine.forward([Row(delta, probe)])
        if not bool(torch.isfinite(output).all()):
            raise InvalidDelta("file", "the forward pass overflows with this delta: its output for a trial text is "
                                       "not finite, so no input could be answered")

    async def delete_task(self, name: str, caller: Caller = OPERATOR,
                          route: str = "DELETE /tasks/{name}") -> TaskInfo:
        """Delete as `caller` (a tenant's own tasks only: another's is absent), with the same side effects."""
        try:
            check_name(name)
            info = await asyncio.to_thread(self.store.delete, name, caller.owner)
        except Exception as err:
            self.audit.record(caller, route, _refusal(err), name)
            raise
        self.cache.discard_task(name)
        self.metrics.tasks.set(len(self.store.list()))
        self.audit.record(caller, route, "deleted", name, info.version)
        return info

    def _tenant_quota(self, caller: Caller) -> Quota | None:
        if caller.owner is None or self.tenants is None:
            return None
        tenant = self.tenants.current.by_name.get(caller.owner)
        return tenant.quota if tenant is not None else None

    async def predict(self, name: str, inputs: list[TextInput], stride: int | None = None,
                      caller: Caller = OPERATOR) -> tuple[TaskInfo, Answer]:
        """Every protocol's one way in: the task's current version answers `inputs` in the mixed batch.

        Token classification splits long texts into windows overlapping by `stride` tokens (default:
        server.windows.default_stride); sequence classification truncates to the task's max_length.
        """
        info = self.task(name, caller)
        if len(inputs) > self.settings.max_inputs:
            raise TooManyInputs(f"{len(inputs)} inputs in one request; the limit is {self.settings.max_inputs}")
        check_inputs(inputs, self.settings.max_input_chars)
        if info.task_type == "token-classification":
            texts = [text for text in inputs if isinstance(text, str)]
            if len(texts) != len(inputs):
                raise UnsupportedInput("token-classification tasks take single texts, not pairs")
            return await self._predict_windows(name, texts, stride, caller)
        max_length = self.runner.max_length(info.max_length)
        return info, await self.batcher.predict(name, inputs, max_length, caller.tenant)  # 429 before tokenising

    async def _predict_windows(self, name: str, texts: list[str], stride: int | None,
                               caller: Caller) -> tuple[TaskInfo, Answer]:
        """Every window of every text as one job's rows; each text's words merged from its windows."""
        for _ in range(3):
            info = self.task(name, caller)
            max_length = self.runner.max_length(info.max_length)
            # Counted before any is built: refusing 4,220 built windows cost 2.2 s and 113 MB.
            count = sum(await self.tokenizer.run(count_windows, self.backbone, texts, max_length, stride))
            if count > self.settings.max_windows:
                raise TooManyInputs(f"the texts of this request take {count} windows of {max_length} tokens; "
                                    f"the limit is {self.settings.max_windows}")
            windows = await self.tokenizer.run(encode_windows, self.backbone, texts, max_length, stride)
            rows = [window for text_windows in windows for window in text_windows]
            sources = [text for text, text_windows in zip(texts, windows, strict=True) for _ in text_windows]
            answer = await self.batcher.submit(Job(name, sources, rows, max_length, tenant=caller.tenant))
            merged, at = [], 0
            for text, text_windows in zip(texts, windows, strict=True):
                predictions = answer.predictions[at:at + len(text_windows)]
                at += len(text_windows)
                if not aligned(text_windows, predictions):
                    break  # a new version with another max_length re-tokenised the rows: window again
                merged.append(merge_windows(text_windows, predictions, text))
            else:
                return info, Answer(answer.task, answer.version, merged)
        raise Replaced(f"task {name!r} was replaced while this request waited, three times; try again")

    def memory(self, caller: Caller = OPERATOR) -> dict[str, Any]:
        """`GET /memory` for this server now, with what its cache holds (per replica, behind a proxy); a
        tenant sees its own tasks and usage, the operator every tenant's."""
        visible = self.tasks(caller)
        names = {info.name for info in visible}
        resident = [(key, size) for key, size in self.cache.resident() if key[0] in names]
        report = memory_report(self.backbone.parameter_bytes, visible, sum(size for _, size in resident))
        report["resident"] = [{"name": key[0], "version": key[1], "bytes": size} for key, size in resident]
        report["replica"] = self.replica
        report["tenants"] = self._usage(caller) if self.tenants is not None else None
        report.update(self.backend_report())
        return report

    def backend_report(self) -> dict[str, str]:
        """`backend` (the engine backend serving) and `backend_reason` (why), for /health and /memory."""
        choice = self.backend or BackendChoice(self.runner.engine.backend.name, "chosen by the caller")
        return {"backend": choice.name, "backend_reason": choice.reason}

    def _usage(self, caller: Caller) -> list[dict[str, Any]]:
        assert self.tenants is not None
        tasks = self.store.list()
        return [{"name": t.name, "tasks": sum(1 for i in tasks if i.owner == t.name),
                 "delta_bytes": sum(i.delta_bytes for i in tasks if i.owner == t.name),
                 "max_tasks": t.max_tasks, "max_delta_bytes": t.max_delta_bytes, "weight": t.weight}
                for t in sorted(self.tenants.current.by_name.values(), key=lambda t: t.name)
                if caller.owner is None or t.name == caller.owner]


def _refusal(err: Exception) -> str:
    """An audit outcome for a write that failed: the exception's kind and sentence."""
    return f"refused: {type(err).__name__}: {err}"


def queue_seconds(settings: Settings) -> float:
    """Seconds of engine work admission lets wait: `max_queue_s`, and at most half the shutdown grace, so
    that what was admitted when a SIGTERM comes is answered before the grace runs out (the other half is
    for the batch in the engine, and for the measured rate being a little optimistic)."""
    return min(settings.max_queue_s, settings.shutdown_grace_s / 2)


def open_settings_store(settings: Settings, backbone: Backbone) -> DeltaStore:
    """The store the settings name: a folder, or `s3://bucket/prefix` (endpoint and poll interval from settings)."""
    options = {"endpoint_url": settings.s3_endpoint_url, "poll_interval_s": settings.store_poll_s} \
        if settings.store.startswith("s3://") else {}
    try:
        return open_store(settings.store, backbone.spec(), max_delta_bytes=settings.max_upload_bytes, **options)
    except PermissionError as err:
        # The image runs as uid 10001; a bind-mounted host folder of another owner ended here in two
        # tracebacks and no hint.
        uid = os.getuid()
        raise StoreNotWritable(
            f"the store {settings.store!r} is not writable by this user (uid {uid}): {err.strerror}: "
            f"{err.filename}. A bind-mounted host folder must belong to uid {uid}: `sudo chown -R {uid} "
            f"<host folder>` (a named volume needs nothing)") from None


def demo_dir(settings: Settings) -> Path | None:
    """The demo deltas: `--demo-dir`, else the wheel's copy (server/demo/, package data put there by
    setup.py), else the checkout's demo/ (a source checkout or an editable install)."""
    here = Path(__file__).resolve().parent
    candidates = [settings.demo_dir] if settings.demo_dir else [here / "demo", here.parent / "demo"]
    return next((folder for folder in candidates if any(folder.glob("*.safetensors"))), None)


def seed_demo(store: DeltaStore, settings: Settings) -> list[str]:
    """Install the demo tasks (file name = task name) that the store lacks; returns the names added."""
    wanted = settings.demo if settings.demo is not None else store.created
    folder = demo_dir(settings) if wanted else None
    if folder is None:
        return []
    added = []
    for path in sorted(folder.glob("*.safetensors")):
        name = path.stem
        if store.get_info(name) is not None:
            continue
        try:
            store.put(name, path.read_bytes())
        except BackboneMismatch:
            log.info("demo task %s is for another backbone; not installed", name)
            continue
        except (InvalidDelta, InvalidTaskName) as err:
            log.warning("demo task %s not installed: %s", name, err)
            continue
        added.append(name)
    if added:
        log.info("installed demo tasks: %s", ", ".join(added))
    return added


def memory_report(backbone_bytes: int, tasks: list[TaskInfo], resident_delta_bytes: int = 0) -> dict[str, Any]:
    """`GET /memory`: one shared backbone + deltas against one fine-tuned copy per task."""
    delta_total = sum(t.delta_bytes for t in tasks)
    serving = backbone_bytes + delta_total
    copies = len(tasks) * backbone_bytes + sum(t.head_bytes for t in tasks)
    saved = copies - serving
    return {
        "backbone_bytes": backbone_bytes,
        "num_tasks": len(tasks),
        "tasks": [{"name": t.name, "method": t.method, "delta_bytes": t.delta_bytes, "head_bytes": t.head_bytes}
                  for t in tasks],
        "delta_bytes_total": delta_total,
        "serving_bytes": serving,
        "finetuned_copies_bytes": copies,
        "saved_bytes": saved,
        "saved_fraction": saved / copies if copies else 0.0,
        "resident_delta_bytes": resident_delta_bytes,
    }
