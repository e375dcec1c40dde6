"""The Open Inference Protocol v2 (KServe, Triton, MLServer clients) over the same tasks and the same batcher.

A task is a model; its version is the task's version. Inputs: `text` (BYTES, one element per
input) and, for sentence-pair tasks, `text_pair` (BYTES, as many elements). Outputs by task type:

- sequence classification: `label` (BYTES [N]), `score` (FP64 [N]), `probabilities` (FP64 [N, C], in the
  order of the model's `labels` parameter);
- regression: `value` (FP64 [N]);
- token classification: `entities` and `tokens` (BYTES [N], each element the JSON list that
  `POST /tasks/{name}/predict` answers for that text);
- embedding: `embedding` (FP32 [N, D], the vectors `/predict` gives, float32 as computed).

Tensors travel as JSON or with the binary tensor data extension (the `Inference-Header-Content-Length`
header; BYTES elements as 4-byte little-endian length + bytes), which `tritonclient` uses by
default. Errors answer `{"error": "<sentence>"}` (see `server.api.errors`). FP64 keeps the
scores exactly as `/predict` gives them.
"""

from __future__ import annotations

import json
import struct
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException

from adapters_store.store import TaskInfo
from server.api.auth import CallerDep
from server.api.body import parse_json_body
from server.api.deps import ServerDep, ServerIfBuiltDep, TaskName
from server.backbone import TextInput
from server.service import Server
from server.tenants import OPERATOR, Caller

router = APIRouter(prefix="/v2", tags=["open inference protocol v2"])
# The live and ready probes are open: an orchestrator probing them has no key.
probes = APIRouter(prefix="/v2", tags=["open inference protocol v2"])

TEXT, TEXT_PAIR = "text", "text_pair"
HEADER_LENGTH = "Inference-Header-Content-Length"


# --------------------------------------------------------------------------- schemas (examples: server/api/examples.py)


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any] = Field(description="the task's type and labels")


class InferInput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: list[Any] | None = Field(None, description="row-major, flat or nested; absent with binary data")


class RequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class InferRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[InferInput]
    outputs: list[RequestedOutput] | None = None


class InferOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[InferOutput]


class OipError(BaseModel):
    error: str


OIP_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": OipError} for code in (400, 401, 403, 404, 409, 413, 429, 503)
}


def _inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """`model`'s JSON schema with its `$defs` inlined, for an `openapi_extra` request body."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(item) for item in node]
        return node

    return inline(schema)


INFER_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": _inline_schema(InferRequest)},
    "application/octet-stream": {"schema": {
        "type": "string", "format": "binary",
        "description": f"binary tensor data extension: the JSON request ({HEADER_LENGTH} bytes), then the tensors"}},
}}}


# --------------------------------------------------------------------------- health and metadata


@router.get("", summary="Server metadata")
async def server_metadata() -> dict[str, Any]:
    return {"name": "deltaserve", "version": "1", "extensions": ["binary_tensor_data"]}


@probes.get("/health/live", summary="Server live")
async def live() -> dict[str, bool]:
    return {"live": True}


@probes.get("/health/ready", summary="Server ready",
            responses={503: {"description": "not ready: loading, shutting down, the batcher stopped or the store "
                                            "unreachable (the same rule as /health)"}})
async def ready(server: ServerIfBuiltDep) -> Response:
    if server is None or server.not_ready() is not None:
        return JSONResponse({"ready": False}, status_code=503, headers={"Retry-After": "5"})
    return JSONResponse({"ready": True})


def _model(server: Server, name: str, version: str | None, caller: Caller = OPERATOR) -> TaskInfo:
    info = server.task(name, caller)
    if version is not None and version != str(info.version):
        raise HTTPException(404, f"task {name!r} serves version {info.version} only, not {version!r}")
    return info


def _outputs(info: TaskInfo) -> list[TensorMetadata]:
    if info.task_type == "embedding":
        return [TensorMetadata(name="embedding", datatype="FP32", shape=[-1, info.embedding_size or -1])]
    if info.task_type == "token-classification":
        return [TensorMetadata(name="entities", datatype="BYTES", shape=[-1]),
                TensorMetadata(name="tokens", datatype="BYTES", shape=[-1])]
    if info.problem_type == "regression":
        return [TensorMetadata(name="value", datatype="FP64", shape=[-1])]
    return [TensorMetadata(name="label", datatype="BYTES", shape=[-1]),
            TensorMetadata(name="score", datatype="FP64", shape=[-1]),
            TensorMetadata(name="probabilities", datatype="FP64", shape=[-1, len(info.labels)])]


def _metadata(info: TaskInfo) -> ModelMetadata:
    inputs = [TensorMetadata(name=TEXT, datatype="BYTES", shape=[-1])]
    if info.task_type != "token-classification":
        inputs.append(TensorMetadata(name=TEXT_PAIR, datatype="BYTES", shape=[-1]))  # optional
    return ModelMetadata(name=info.name, versions=[str(info.version)], platform="deltaserve", inputs=inputs,
                         outputs=_outputs(info),
                         parameters={"task_type": info.task_type, "problem_type": info.problem_type,
                                     "labels": list(info.labels)})


def _ready(server: Server, info: TaskInfo) -> dict[str, Any]:
    if info.backbone_fingerprint and info.backbone_fingerprint != server.backbone.fingerprint:
        raise HTTPException(409, f"task {info.name!r} was made for another backbone; it cannot answer")
    return {"name": info.name, "ready": True}


@router.get("/models/{name}", response_model=ModelMetadata, responses=OIP_ERRORS, summary="Model metadata")
async def model_metadata(server: ServerDep, name: TaskName) -> ModelMetadata:
    return _metadata(_model(server, name, None))


@router.get("/models/{name}/versions/{version}", response_model=ModelMetadata, responses=OIP_ERRORS,
            summary="Model metadata (one version)")
async def model_version_metadata(server: ServerDep, name: TaskName, version: str) -> ModelMetadata:
    return _metadata(_model(server, name, version))


@router.get("/models/{name}/ready", responses=OIP_ERRORS, summary="Model ready")
async def model_ready(server: ServerDep, name: TaskName) -> dict[str, Any]:
    """200 when the task can answer; 404 unknown, 409 made for another backbone (4xx = not ready)."""
    return _ready(server, _model(server, name, None))


@router.get("/models/{name}/versions/{version}/ready", responses=OIP_ERRORS, summary="Model ready (one version)")
async def model_version_ready(server: ServerDep, name: TaskName, version: str) -> dict[str, Any]:
    return _ready(server, _model(server, name, version))


# --------------------------------------------------------------------------- inference


@router.post("/models/{name}/infer", response_model=InferResponse, responses=OIP_ERRORS,
             openapi_extra=INFER_BODY, summary="Model infer")
async def infer(request: Request, server: ServerDep, name: TaskName, caller: CallerDep,
                header_length: Annotated[int | None, Header(alias=HEADER_LENGTH)] = None) -> Response:
    """Inputs `text` (and `text_pair`) as BYTES; outputs by task type (see `GET /v2/models/{name}`)."""
    return await _infer(server, caller, name, None, request, header_length)


@router.post("/models/{name}/versions/{version}/infer", response_model=InferResponse, responses=OIP_ERRORS,
             openapi_extra=INFER_BODY, summary="Model infer (one version)")
async def infer_version(request: Request, server: ServerDep, name: TaskName, version: str, caller: CallerDep,
                        header_length: Annotated[int | None, Header(alias=HEADER_LENGTH)] = None) -> Response:
    return await _infer(server, caller, name, version, request, header_length)


async def _infer(server: Server, caller: Caller, name: str, version: str | None, http: Request,
                 header_length: int | None) -> Response:
    info = _model(server, name, version, caller)
    request, binary = _parse(await http.body(), header_length, http.headers.get("content-encoding"))
    inputs = _texts(request, binary, info)
    _, answer = await server.predict(name, inputs, caller=caller)
    if version is not None and str(answer.version) != version:  # replaced while queued
        raise HTTPException(409, f"task {name!r} was replaced by version {answer.version} while this request waited")
    outputs = _output_tensors(info, answer.predictions)
    wanted = _wanted(request, outputs)
    head: dict[str, Any] = {"model_name": name, "model_version": str(answer.version)}
    if request.id is not None:
        head["id"] = request.id
    head["outputs"], chunks = [], []
    for out_name, (datatype, shape, values) in outputs.items():
        if out_name not in wanted:
            continue
        tensor: dict[str, Any] = {"name": out_name, "datatype": datatype, "shape": shape}
        if wanted[out_name]:
            raw = _serialize(datatype, values)
            tensor["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            tensor["data"] = values
        head["outputs"].append(tensor)
    header = json.dumps(head).encode()
    if not chunks:
        return Response(header, media_type="application/json")
    return Response(header + b"".join(chunks), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(header))})


def _parse(body: bytes, header_length: int | None, content_encoding: str | None = None) -> tuple[InferRequest, bytes]:
    """The JSON request and the binary tensor data after it (empty without the extension); the JSON is read
    as every route reads a JSON body (`parse_json_body`: UTF-8 only, bounded nesting and digits)."""
    if header_length is not None and not 0 < header_length <= len(body):
        raise HTTPException(400, f"{HEADER_LENGTH} is {header_length}, but the body has {len(body)} bytes")
    split = len(body) if header_length is None else header_length
    try:
        request = InferRequest.model_validate(parse_json_body(body[:split], content_encoding))
    except json.JSONDecodeError as err:
        raise HTTPException(400, f"the body is not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") \
            from None
    except ValidationError as err:
        parts = []
        for e in err.errors():
            where = ".".join(str(x) for x in e.get("loc", ()))
            parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
        raise HTTPException(400, "invalid inference request: " + "; ".join(parts)) from None
    return request, body[split:]


def _texts(request: InferRequest, binary: bytes, info: TaskInfo) -> list[TextInput]:
    tensors: dict[str, list[str]] = {}
    offset = 0
    for tensor in request.inputs:
        if tensor.name not in (TEXT, TEXT_PAIR):
            raise HTTPException(400, f"unknown input {tensor.name!r}: this model takes '{TEXT}' (and '{TEXT_PAIR}')")
        if tensor.name in tensors:
            raise HTTPException(400, f"input {tensor.name!r} is given twice")
        if tensor.datatype != "BYTES":
            raise HTTPException(400, f"input {tensor.name!r} must be BYTES, not {tensor.datatype}")
        size = tensor.parameters.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(binary):
                raise HTTPException(400, f"input {tensor.name!r}: binary_data_size {size} runs past the body")
            values = _deserialize_bytes(binary[offset:offset + size], tensor.name)
            offset += size
        elif tensor.data is not None:
            values = _flatten(tensor.data, tensor.name)
        else:
            raise HTTPException(400, f"input {tensor.name!r} has neither data nor binary_data_size")
        expected = int(np.prod(tensor.shape)) if tensor.shape else 1
        if any(d < 0 for d in tensor.shape) or expected != len(values):
            raise HTTPException(400, f"input {tensor.name!r} has shape {tensor.shape} but {len(values)} elements")
        for i, value in enumerate(values):
            if not value.strip():
                raise HTTPException(400, f"input {tensor.name!r}[{i}] is an empty text")
        tensors[tensor.name] = values
    if offset != len(binary):
        raise HTTPException(400, f"{len(binary) - offset} bytes of binary data belong to no input")
    if TEXT not in tensors:
        raise HTTPException(400, f"the request needs an input named '{TEXT}' (BYTES)")
    texts = tensors[TEXT]
    if not texts:
        raise HTTPException(400, f"input '{TEXT}' is empty")
    if TEXT_PAIR not in tensors:
        return list(texts)
    if info.task_type == "token-classification":
        raise HTTPException(400, f"token-classification tasks take single texts: drop '{TEXT_PAIR}'")
    pairs = tensors[TEXT_PAIR]
    if len(pairs) != len(texts):
        raise HTTPException(400, f"'{TEXT}' has {len(texts)} elements but '{TEXT_PAIR}' has {len(pairs)}")
    return list(zip(texts, pairs, strict=True))


def _flatten(data: list[Any], name: str) -> list[str]:
    out: list[str] = []
    for item in data:
        if isinstance(item, list):
            out.extend(_flatten(item, name))
        elif isinstance(item, str):
            out.append(item)
        else:
            raise HTTPException(400, f"input {name!r}: BYTES elements in JSON are strings, not {type(item).__name__}")
    return out


def _deserialize_bytes(raw: bytes, name: str) -> list[str]:
    """Triton's BYTES serialisation: each element a 4-byte little-endian length, then its bytes."""
    values, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise HTTPException(400, f"input {name!r}: truncated BYTES element length")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise HTTPException(400, f"input {name!r}: a BYTES element runs past its tensor")
        try:
            values.append(raw[offset:offset + size].decode("utf-8"))
        except UnicodeDecodeError:
            raise HTTPException(400, f"input {name!r}[{len(values)}] is not UTF-8 text") from None
        offset += size
    return values


def _serialize(datatype: str, values: list[Any]) -> bytes:
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(b)) + b for b in (v.encode("utf-8") for v in values))
    return np.asarray(values, dtype="<f4" if datatype == "FP32" else "<f8").tobytes()


def _output_tensors(info: TaskInfo, predictions: list[dict[str, Any]]) -> dict[str, tuple[str, list[int], list[Any]]]:
    """name -> (datatype, shape, flat values), from the predictions `/predict` gives."""
    n = len(predictions)
    if info.task_type == "embedding":
        if not all("embedding" in p for p in predictions):  # replaced by a classifier while queued
            raise HTTPException(409, f"task {info.name!r} was replaced by another type of task while this request "
                                     "waited; try again")
        width = len(predictions[0]["embedding"]) if predictions else 0
        return {"embedding": ("FP32", [n, width], [x for p in predictions for x in p["embedding"]])}
    if info.task_type == "token-classification":
        return {"entities": ("BYTES", [n], [json.dumps(p["entities"]) for p in predictions]),
                "tokens": ("BYTES", [n], [json.dumps(p["tokens"]) for p in predictions])}
    if info.problem_type == "regression":
        return {"value": ("FP64", [n], [p["value"] for p in predictions])}
    labels = list(info.labels)
    return {"label": ("BYTES", [n], [p["label"] for p in predictions]),
            "score": ("FP64", [n], [p["score"] for p in predictions]),
            "probabilities": ("FP64", [n, len(labels)], [p["scores"][label] for p in predictions for label in labels])}


def _wanted(request: InferRequest, outputs: dict[str, Any]) -> dict[str, bool]:
    """Output name -> binary or not: the requested outputs, else all (binary when `binary_data_output`)."""
    if not request.outputs:
        binary = bool(request.parameters.get("binary_data_output", False))
        return dict.fromkeys(outputs, binary)
    wanted: dict[str, bool] = {}
    for out in request.outputs:
        if out.name not in outputs:
            raise HTTPException(400, f"unknown output {out.name!r}: this model gives {', '.join(outputs)}")
        if out.parameters.get("classification"):
            raise HTTPException(400, "the classification extension is not supported: read 'label' and 'score'")
        wanted[out.name] = bool(out.parameters.get("binary_data", request.parameters.get("binary_data_output")))
    return wanted
