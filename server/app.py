"""The HTTP API of ../shared/spec/http-api.md, on FastAPI.

`create_app(settings)` builds the application; the heavy parts (backbone, store, engine,
cache, batcher) are made at startup in `Server.build` and closed at shutdown, after the
batcher has finished every request it accepted. This module sees only JSON, bytes and the
store's `TaskInfo`: tensors stay behind the batcher.

Every error answers `{"detail": "<sentence>"}`: the handlers at the bottom map the domain
exceptions (unknown task, invalid delta, overload, ...) to their status codes in one place.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fastapi import Depends, FastAPI, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field, field_validator
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from adapters_store.format import BackboneMismatch, InvalidDelta
from adapters_store.storage import (
    NAME_PATTERN,
    DeltaStore,
    DeltaTooLarge,
    InvalidTaskName,
    LocalDeltaStore,
    StoreCorrupt,
    TaskInfo,
    TaskNotFound,
    check_name,
)
from server.backbone import Backbone
from server.batching import Batcher, BatchRunner, Job, Overloaded, ShuttingDown, Tokenizer
from server.cache import DeltaCache
from server.engine import Engine
from server.metrics import Metrics
from server.postprocess import UnsupportedInput
from server.settings import Settings

log = logging.getLogger("deltaserve")

TASK_NAME = PathParam(description=f"task name, {NAME_PATTERN.pattern}")


# --------------------------------------------------------------------------- the server's parts


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

    @classmethod
    def build(cls, settings: Settings, backbone: Backbone | None = None) -> Server:
        if settings.threads:
            torch.set_num_threads(settings.threads)
        if backbone is None:
            backbone = Backbone.load(settings.backbone, device=settings.device, max_length=settings.max_length)
        store = LocalDeltaStore(settings.store, backbone.spec(), max_delta_bytes=settings.max_upload_bytes)
        seed_demo(store, settings)
        for info in store.list():
            if info.backbone_fingerprint != backbone.fingerprint:
                log.warning("task %s was made for backbone %s, not this one (%s): it will answer 409",
                            info.name, info.backbone_fingerprint, backbone.fingerprint)
        cache = DeltaCache(settings.cache_bytes)
        metrics = Metrics()
        metrics.watch_cache(cache.stats)
        tokenizer = Tokenizer(backbone)
        runner = BatchRunner(backbone, Engine(backbone), cache, store, tokenizer, settings.max_length)
        batcher = Batcher(runner, max_batch_tokens=settings.max_batch_tokens,
                          max_batch_requests=settings.max_batch_requests, wait_s=settings.batch_wait_ms / 1000,
                          max_queue=settings.max_queue, metrics=metrics)
        return cls(settings, backbone, store, cache, tokenizer, runner, batcher, metrics)

    async def close(self) -> None:
        await self.batcher.close()
        self.tokenizer.close()


def demo_dir(settings: Settings) -> Path | None:
    """The demo deltas: `--demo-dir`, else the repository's demo/ (found from an editable install)."""
    folder = settings.demo_dir or Path(__file__).resolve().parents[1] / "demo"
    return folder if any(folder.glob("*.safetensors")) else None


def seed_demo(store: DeltaStore, settings: Settings) -> list[str]:
    """Install the demo tasks (file name = task name) that the store lacks; returns the names added."""
    wanted = settings.demo if settings.demo is not None else getattr(store, "created", False)
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


# --------------------------------------------------------------------------- request and response models


class PredictRequest(BaseModel):
    inputs: str | list[str] | list[tuple[str, str]] = Field(
        description="one text, a list of texts, or a list of [text_a, text_b] pairs",
        examples=["a gripping, funny film", ["great", "awful"], [["A man sleeps.", "Someone rests."]]],
    )

    @field_validator("inputs", mode="before")
    @classmethod
    def _shape(cls, value: Any) -> Any:
        # One readable message instead of pydantic's error per union branch.
        def text(item: Any, where: str) -> None:
            if not isinstance(item, str):
                raise ValueError(f"{where} must be a text, a list of texts or a list of [text_a, text_b] pairs")
            if not item.strip():
                raise ValueError(f"{where} is an empty text")

        if isinstance(value, list):
            if not value:
                raise ValueError("inputs is empty")
            pairs = isinstance(value[0], list | tuple)
            for i, item in enumerate(value):
                if pairs:
                    if not isinstance(item, list | tuple) or len(item) != 2:
                        raise ValueError(f"inputs[{i}] must be a pair [text_a, text_b] like inputs[0]")
                    text(item[0], f"inputs[{i}][0]")
                    text(item[1], f"inputs[{i}][1]")
                else:
                    text(item, f"inputs[{i}]")
        else:
            text(value, "inputs")
        return value

    def as_list(self) -> list[str | tuple[str, str]]:
        return [self.inputs] if isinstance(self.inputs, str) else list(self.inputs)


class SequencePrediction(BaseModel):
    label: str
    score: float
    scores: dict[str, float]


class RegressionPrediction(BaseModel):
    value: float


class TokenLabel(BaseModel):
    word: str
    start: int
    end: int
    label: str
    score: float


class Entity(BaseModel):
    text: str
    label: str
    start: int
    end: int
    score: float


class TokenPrediction(BaseModel):
    tokens: list[TokenLabel]
    entities: list[Entity]


class PredictResponse(BaseModel):
    task: str
    version: int
    predictions: list[SequencePrediction | RegressionPrediction | TokenPrediction]


class TaskList(BaseModel):
    tasks: list[TaskInfo]  # the store's dataclass: its fields are the documented schema


class MemoryTask(BaseModel):
    name: str
    method: str
    delta_bytes: int
    head_bytes: int


class MemoryReport(BaseModel):
    backbone_bytes: int
    num_tasks: int
    tasks: list[MemoryTask]
    delta_bytes_total: int
    serving_bytes: int
    finetuned_copies_bytes: int
    saved_bytes: int
    saved_fraction: float
    resident_delta_bytes: int = Field(description="bytes of prepared deltas in the device cache now")


class ErrorBody(BaseModel):
    detail: str


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (401, 404, 409, 413, 422, 429, 503)
}

UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {"type": "object", "required": ["file"],
                           "properties": {"file": {"type": "string", "format": "binary"}}},
            },
        },
    }
}


# --------------------------------------------------------------------------- the application


def create_app(settings: Settings | None = None, *, backbone: Backbone | None = None) -> FastAPI:
    """The application; `backbone` skips loading one (tests pass a tiny one)."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server = await asyncio.to_thread(Server.build, settings, backbone)
        server.batcher.start()
        app.state.server = server
        log.info("deltaserve ready: backbone %s, %d tasks", server.backbone.name, len(server.store.list()))
        try:
            yield
        finally:
            await server.close()

    app = FastAPI(title="deltaserve", version="1",
                  description="One frozen encoder, many task deltas, any mix of tasks in one forward pass.",
                  lifespan=lifespan)
    # Outermost last: the metrics middleware also counts what the body limit refuses.
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_request_bytes)
    app.add_middleware(MetricsMiddleware)

    def server_of(request: Request) -> Server:
        return request.app.state.server

    def require_admin(request: Request) -> None:
        token = settings.admin_token
        if not token:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise HTTPException(401, "this route needs 'Authorization: Bearer <admin token>'",
                                headers={"WWW-Authenticate": "Bearer"})

    # ------------------------------------------------------------------ serving

    @app.post("/tasks/{name}/predict", response_model=PredictResponse, responses=ERRORS, tags=["serving"])
    async def predict(body: PredictRequest, request: Request, name: str = TASK_NAME) -> Response:
        """Answer one text, a list of texts, or a list of pairs with the task's current version."""
        server = server_of(request)
        check_name(name)
        info = server.store.get_info(name)
        if info is None:
            raise TaskNotFound(name)
        inputs = body.as_list()
        if len(inputs) > settings.max_inputs:
            raise HTTPException(413, f"{len(inputs)} inputs in one request; the limit is {settings.max_inputs}")
        if info.task_type == "token-classification" and not isinstance(inputs[0], str):
            raise UnsupportedInput("token-classification tasks take single texts, not pairs")
        max_length = server.runner.max_length(info.max_length)
        encoded = await server.tokenizer.encode(inputs, max_length)
        answer = await server.batcher.submit(Job(name, inputs, encoded, max_length))
        return JSONResponse({"task": name, "version": answer.version, "predictions": answer.predictions})

    # ------------------------------------------------------------------ the store

    @app.get("/tasks", response_model=TaskList, tags=["tasks"])
    async def list_tasks(request: Request) -> Response:
        return JSONResponse({"tasks": [info.to_dict() for info in server_of(request).store.list()]})

    @app.get("/tasks/{name}", response_model=TaskInfo, responses=ERRORS, tags=["tasks"])
    async def get_task(request: Request, name: str = TASK_NAME) -> Response:
        check_name(name)
        info = server_of(request).store.get_info(name)
        if info is None:
            raise TaskNotFound(name)
        return JSONResponse(info.to_dict())

    @app.put("/tasks/{name}", response_model=TaskInfo, status_code=201, responses=ERRORS, tags=["tasks"],
             dependencies=[Depends(require_admin)], openapi_extra=UPLOAD_BODY)
    async def put_task(request: Request, name: str = TASK_NAME) -> Response:
        """Upload a delta (raw body or multipart field `file`): 201 created, 200 replaced."""
        server = server_of(request)
        check_name(name)
        data = await read_upload(request, settings.max_upload_bytes)
        info, created = await run_in_threadpool(server.store.put, name, data)
        server.cache.discard_task(name)  # old versions will never be asked for again
        server.metrics.tasks.set(len(server.store.list()))
        return JSONResponse(info.to_dict(), status_code=201 if created else 200)

    @app.delete("/tasks/{name}", status_code=204, responses=ERRORS, tags=["tasks"],
                dependencies=[Depends(require_admin)])
    async def delete_task(request: Request, name: str = TASK_NAME) -> Response:
        server = server_of(request)
        check_name(name)
        await run_in_threadpool(server.store.delete, name)
        server.cache.discard_task(name)
        server.metrics.tasks.set(len(server.store.list()))
        return Response(status_code=204)

    # ------------------------------------------------------------------ backbone, memory, operations

    @app.get("/backbone", tags=["operations"])
    async def backbone_info(request: Request) -> dict[str, Any]:
        return server_of(request).backbone.describe()

    @app.get("/memory", response_model=MemoryReport, tags=["operations"])
    async def memory(request: Request) -> Response:
        server = server_of(request)
        return JSONResponse(memory_report(server.backbone.parameter_bytes, server.store.list(),
                                          int(server.cache.stats()["resident_bytes"])))

    @app.get("/health", tags=["operations"])
    async def health(request: Request) -> dict[str, Any]:
        server = server_of(request)
        return {"status": "ok", "backbone": server.backbone.name, "tasks": len(server.store.list()),
                "queue_depth": server.batcher.depth}

    @app.get("/metrics", tags=["operations"], response_class=Response)
    async def metrics(request: Request) -> Response:
        server = server_of(request)
        server.metrics.tasks.set(len(server.store.list()))
        return Response(server.metrics.render(), media_type=Metrics.CONTENT_TYPE)

    install_error_handlers(app)
    return app


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


async def read_upload(request: Request, limit: int) -> bytes:
    """The delta's bytes from a raw body or a multipart field `file`, refusing more than `limit`."""
    multipart = request.headers.get("content-type", "").startswith("multipart/form-data")
    allowed = limit + 64 * 1024 if multipart else limit  # room for the multipart framing
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > allowed:
        raise DeltaTooLarge(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > allowed:
            raise DeltaTooLarge(size, limit)
        chunks.append(chunk)
    body = b"".join(chunks)
    if multipart:
        body = await _multipart_file(request.headers, body)
        if len(body) > limit:
            raise DeltaTooLarge(len(body), limit)
    if not body:
        raise HTTPException(422, "the request body is empty: send the delta file")
    return body


async def _multipart_file(headers: Headers, body: bytes) -> bytes:
    async def stream() -> AsyncIterator[bytes]:
        yield body

    try:
        form = await MultiPartParser(headers, stream(), max_files=4, max_fields=16).parse()
    except MultiPartException as err:
        raise HTTPException(422, f"malformed multipart body: {err.message}") from None
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise HTTPException(422, "multipart upload needs a file field named 'file'")
    data = await upload.read()
    await form.close()
    return data


# --------------------------------------------------------------------------- errors


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _validation_detail(err: RequestValidationError) -> str:
    parts = []
    for e in err.errors():
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        message = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        if e.get("type") == "json_invalid":
            parts.append(f"the body is not valid JSON ({e.get('ctx', {}).get('error', message)})")
        elif not where:
            parts.append('the body must be a JSON object like {"inputs": "some text"}')
        elif e.get("type") == "missing":
            parts.append(f"{where or 'body'} is required")
        else:
            parts.append(f"{where}: {message}" if where and not message.startswith(where) else message)
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    simple: dict[type[Exception], int] = {
        TaskNotFound: 404,
        InvalidTaskName: 422,
        BackboneMismatch: 409,
        InvalidDelta: 422,
        DeltaTooLarge: 413,
        UnsupportedInput: 422,
        StoreCorrupt: 500,  # the disk changed under the store: the operator's problem, said plainly
    }
    for exc_type, status in simple.items():
        app.add_exception_handler(exc_type, lambda _r, exc, status=status: _error(status, str(exc)))

    @app.exception_handler(RequestValidationError)
    async def validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, _validation_detail(exc))

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(Overloaded)
    async def overloaded(_request: Request, exc: Overloaded) -> JSONResponse:
        return _error(429, str(exc), {"Retry-After": str(exc.retry_after)})

    @app.exception_handler(ShuttingDown)
    async def shutting_down(_request: Request, exc: ShuttingDown) -> JSONResponse:
        return _error(503, str(exc), {"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def bug(_request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error", exc_info=exc)
        return _error(500, f"internal error: {type(exc).__name__}")


# --------------------------------------------------------------------------- metrics


Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class MetricsMiddleware:
    """Counts every HTTP request by route template, task and status, and times it."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            server: Server | None = getattr(scope["app"].state, "server", None)
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            name = scope.get("path_params", {}).get("name", "")
            # Only known task names become label values: a client cannot grow the label set.
            task = name if name and server is not None and server.store.get_info(name) is not None else ""
            if server is not None:
                server.metrics.requests.labels(path, task, str(status)).inc()
                server.metrics.latency.labels(path).observe(time.perf_counter() - started)


class BodyLimitMiddleware:
    """413 for a request body over `limit`, before anything parses it; uploads (PUT) have their own limit.

    A long text is truncated only after tokenising all of it, so without this a single huge
    JSON body would cost the tokenizer thread its whole length.
    """

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("PUT", "GET", "HEAD", "DELETE"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, receive, send)
            return
        if declared.isdigit():
            await self.app(scope, receive, send)
            return
        # A body without a length: read it here (up to the limit), then replay it to the app.
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.limit:
                await self._refuse(scope, receive, send)
                return
            if message["type"] != "http.request" or not message.get("more_body", False):
                break

        async def replay() -> MutableMapping[str, Any]:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = _error(413, f"the request body is over the limit of {self.limit} bytes")
        await response(scope, receive, send)
