"""Routes of the tasks family: predict with a task, and the store (list, describe, upload, delete)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from adapters_store.store import DeltaTooLarge, TaskInfo, check_name
from server.api.auth import CallerDep, WriterDep, route_of
from server.api.body import StrictJSONRoute
from server.api.deps import ServerDep, TaskName
from server.api.schemas import ERRORS, UPLOAD_BODY, PredictRequest, PredictResponse, TaskList

router = APIRouter(route_class=StrictJSONRoute)


@router.post("/tasks/{name}/predict", response_model=PredictResponse, responses=ERRORS, tags=["serving"])
async def predict(body: PredictRequest, server: ServerDep, name: TaskName, caller: CallerDep) -> Response:
    """Answer one text, a list of texts, or a list of pairs with the task's current version."""
    _, answer = await server.predict(name, body.as_list(), caller=caller)
    return JSONResponse({"task": name, "version": answer.version, "predictions": answer.predictions})


@router.get("/tasks", response_model=TaskList, tags=["tasks"], responses=ERRORS)
async def list_tasks(server: ServerDep, caller: CallerDep) -> Response:
    """The tasks the caller may see: a tenant's own, or all."""
    return JSONResponse({"tasks": [info.to_dict() for info in server.tasks(caller)]})


@router.get("/tasks/{name}", response_model=TaskInfo, responses=ERRORS, tags=["tasks"])
async def get_task(server: ServerDep, name: TaskName, caller: CallerDep) -> Response:
    return JSONResponse(server.task(name, caller).to_dict())


@router.put("/tasks/{name}", response_model=TaskInfo, status_code=201, responses=ERRORS, tags=["tasks"],
            dependencies=[WriterDep], openapi_extra=UPLOAD_BODY)
async def put_task(request: Request, server: ServerDep, name: TaskName, caller: CallerDep) -> Response:
    """Upload a delta (raw body or multipart field `file`): 201 created, 200 replaced; 409 when the name is
    another tenant's, 403 past the tenant's quota."""
    check_name(name)
    server.check_put(name, caller, route_of(request))
    data = await read_upload(request, server.settings.max_upload_bytes)
    info, created = await server.put_task(name, data, caller, route_of(request))
    return JSONResponse(info.to_dict(), status_code=201 if created else 200)


@router.delete("/tasks/{name}", status_code=204, responses=ERRORS, tags=["tasks"], dependencies=[WriterDep])
async def delete_task(request: Request, server: ServerDep, name: TaskName, caller: CallerDep) -> Response:
    await server.delete_task(name, caller, route_of(request))
    return Response(status_code=204)


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
    files = form.getlist("file")
    if len(files) > 1:
        await form.close()
        raise HTTPException(422, f"multipart upload has {len(files)} 'file' parts; send exactly one")
    upload = files[0] if files else None
    if not isinstance(upload, UploadFile):
        await form.close()
        raise HTTPException(422, "multipart upload needs a file field named 'file'")
    data = await upload.read()
    await form.close()
    return data
