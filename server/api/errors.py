"""Error mapping: every error answers `{"detail": "<sentence>"}` with its status code, decided here once.

Domain exceptions (unknown task, invalid delta, overload, ...) are raised where they happen and
mapped to status codes by the handlers `install_error_handlers` puts on the app.

Under `/v2` (the Open Inference Protocol) and `/models/` (the Hugging Face Inference API shapes) the
same sentence answers as `{"error": "<sentence>"}`, as those protocols do, and a malformed request
is their 400 rather than 422. Under `/v1` (OpenAI) it answers OpenAI's
`{"error": {"message", "type", "param", "code"}}`, and at `/embed` (text-embeddings-inference)
TEI's `{"error": "<sentence>", "error_type": "Validation" | "Overloaded" | ...}`, both with the
status codes above (OpenAI's client reads 422 as UnprocessableEntityError, TEI itself answers 422).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from adapters_store.format import BackboneMismatch, InvalidDelta
from adapters_store.store import (
    DeltaTooLarge,
    InvalidTaskName,
    NameTaken,
    QuotaExceeded,
    StoreCorrupt,
    StoreUnavailable,
    TaskNotFound,
)
from server.backbone import InvalidText
from server.batching import Overloaded, ShuttingDown
from server.embeddings import NotAnEmbeddingModel, UnknownModel
from server.postprocess import UnsupportedInput
from server.service import Loading, Replaced, TooManyInputs
from server.windows import BadStride

log = logging.getLogger("deltaserve")

# Domain exception -> status; the body is the exception's own sentence.
STATUS: dict[type[Exception], int] = {
    TaskNotFound: 404,
    NameTaken: 409,
    QuotaExceeded: 403,
    InvalidTaskName: 422,
    BackboneMismatch: 409,
    InvalidDelta: 422,
    DeltaTooLarge: 413,
    UnsupportedInput: 422,
    TooManyInputs: 413,
    BadStride: 422,
    Replaced: 409,
    InvalidText: 422,
    UnknownModel: 404,
    NotAnEmbeddingModel: 422,
    StoreCorrupt: 500,  # the disk changed under the store: the operator's problem, said plainly
}


def speaks_error_key(path: str) -> bool:
    """Whether `path` belongs to a protocol whose errors read `{"error": ...}` (OIP v2, Hugging Face)."""
    return path == "/v2" or path.startswith(("/v2/", "/models/"))


def speaks_openai(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


# OpenAI's error `type` and `code` by status (its API says `invalid_request_error` for most 4xx).
_OPENAI_CODES = {401: ("invalid_request_error", "invalid_api_key"), 403: ("invalid_request_error", "forbidden"),
                 404: ("invalid_request_error", "model_not_found"), 413: ("invalid_request_error", "input_too_large"),
                 422: ("invalid_request_error", "invalid_input"), 429: ("rate_limit_error", "rate_limit_exceeded")}


def openai_error(status: int, detail: str) -> dict[str, object]:
    kind, code = _OPENAI_CODES.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
    param = "model" if status == 404 else ("input" if status in (413, 422) and "input" in detail else None)
    return {"error": {"message": detail, "type": kind, "param": param, "code": code}}


def tei_error_type(status: int) -> str:
    """TEI's `error_type`: Overloaded (429), Unhealthy (503), Backend (other 5xx), else Validation."""
    return {429: "Overloaded", 503: "Unhealthy"}.get(status, "Backend" if status >= 500 else "Validation")


def error_body(status: int, detail: str, path: str = "") -> tuple[int, dict[str, object]]:
    """The status and JSON body an error answers with at `path`, in that protocol's own shape."""
    if speaks_openai(path):
        return status, openai_error(status, detail)
    if path == "/embed":
        return status, {"error": detail, "error_type": tei_error_type(status)}
    if speaks_error_key(path):
        return (400 if status == 422 else status), {"error": detail}
    return status, {"detail": detail}


def error_response(status: int, detail: str, headers: dict[str, str] | None = None, path: str = "") -> JSONResponse:
    # A sentence quoting the client's input may hold a lone surrogate, which UTF-8 cannot carry:
    # escaped, or answering the error would itself fail.
    detail = detail.encode("utf-8", "backslashreplace").decode("utf-8")
    status, body = error_body(status, detail, path)
    return JSONResponse(body, status_code=status, headers=headers)


def validation_detail(err: RequestValidationError) -> str:
    """pydantic's list of errors as one sentence a person can act on."""
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


def status_of(exc: Exception) -> tuple[int, dict[str, str] | None]:
    """The status code and extra headers an exception answers with (500 for anything unexpected)."""
    if isinstance(exc, HTTPException):
        return exc.status_code, exc.headers
    if isinstance(exc, RequestValidationError):
        return 422, None
    if isinstance(exc, Overloaded):
        return 429, {"Retry-After": str(exc.retry_after)}
    if isinstance(exc, ShuttingDown | StoreUnavailable | Loading):  # StoreUnavailable: the object store is down
        return 503, {"Retry-After": "5"}
    for exc_type, status in STATUS.items():
        if isinstance(exc, exc_type):
            return status, None
    return 500, None


def detail_of(exc: Exception) -> str:
    """The sentence an exception answers with."""
    if isinstance(exc, HTTPException):
        return str(exc.detail)
    if isinstance(exc, RequestValidationError):
        return validation_detail(exc)
    if status_of(exc)[0] == 500 and not isinstance(exc, StoreCorrupt):
        return f"internal error: {type(exc).__name__}"
    return str(exc)


async def handle(request: Request, exc: Exception) -> JSONResponse:
    status, headers = status_of(exc)
    if status == 500 and not isinstance(exc, StoreCorrupt):
        log.error("unhandled error", exc_info=exc)
    return error_response(status, detail_of(exc), headers, request.url.path)


def install_error_handlers(app: FastAPI) -> None:
    for exc_type in (*STATUS, RequestValidationError, HTTPException, Overloaded, ShuttingDown, StoreUnavailable,
                     Loading, Exception):
        app.add_exception_handler(exc_type, handle)
