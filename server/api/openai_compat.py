"""OpenAI's embeddings API at `/v1`, so `openai.OpenAI(base_url="http://host:8000/v1")` works unchanged.

- `POST /v1/embeddings`: `model` is an embedding task's name or the backbone's (`GET /backbone`'s
  `name`, e.g. `all-MiniLM-L6-v2`: the bare backbone, mean-pooled and normalised); `input` one
  text or a list of texts; `encoding_format` `float` (default here) or `base64` (little-endian
  float32 bytes, what the `openai` client asks for by default and decodes itself); `dimensions`,
  if given, must be the model's own size (vectors are never cut). `usage` counts the tokens the
  inputs ran with, special tokens included.
- `GET /v1/models`, `GET /v1/models/{name}`: the backbone and the embedding tasks.

Errors answer OpenAI's `{"error": {"message", "type", "param", "code"}}` (see `server.api.errors`).
"""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException

from server.api.auth import CallerDep
from server.api.body import StrictJSONRoute
from server.api.deps import ServerDep, TaskName
from server.api.schemas import require_text, require_texts
from server.embeddings import EmbeddingModel, NotAnEmbeddingModel, embed, embedding_models, resolve

router = APIRouter(prefix="/v1", tags=["openai"], route_class=StrictJSONRoute)


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail


OPENAI_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": OpenAIError} for code in (401, 404, 413, 422, 429, 503)
}


class EmbeddingsRequest(BaseModel):
    # OpenAI's clients send fields this server has no use for; they are accepted and ignored. Strict: a
    # wrong type (`"dimensions": "384"`, `true`) is 422, never coerced.
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str = Field(description="an embedding task's name, or the backbone's (GET /v1/models)",
                       examples=["all-MiniLM-L6-v2"])
    input: str | list[str] = Field(description="one text or a list of texts",
                                   examples=["The cat sat on the mat.", ["first text", "second text"]])
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="float: lists of numbers; base64: each vector's little-endian float32 bytes")
    dimensions: int | None = Field(None, ge=1, description="if given, must equal the model's vector size")
    user: str | None = Field(None, description="accepted and ignored")

    @field_validator("input", mode="before")
    @classmethod
    def _texts(cls, value: Any) -> Any:
        def text(item: Any, where: str) -> None:
            if isinstance(item, int | list):
                raise ValueError(f"{where} is a token array; this server takes text only")
            require_text(item, where, "must be a text or a list of texts")

        return require_texts(value, "input", text)


class EmbeddingItem(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="the vector, or its float32 bytes in base64")


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingItem]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="Unix time the task's version was stored (0 for the backbone)")
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


@router.post("/embeddings", response_model=EmbeddingsResponse, responses=OPENAI_ERRORS, summary="Create embeddings")
async def create_embeddings(body: EmbeddingsRequest, server: ServerDep, caller: CallerDep) -> Response:
    """One vector per input text, from an embedding task or the bare backbone, in the shared batch."""
    model = resolve(server, body.model, caller)
    if body.dimensions is not None and body.dimensions != model.dimensions:
        raise HTTPException(422, f"dimensions is {body.dimensions}, but model {model.name!r} gives "
                                 f"{model.dimensions}-dimensional vectors; leave dimensions out")
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    result = await embed(server, body.model, list(texts), caller=caller)
    data = [{"object": "embedding", "index": i, "embedding": _encode(vector, body.encoding_format)}
            for i, vector in enumerate(result.vectors)]
    return JSONResponse({"object": "list", "data": data, "model": result.model,
                         "usage": {"prompt_tokens": result.tokens, "total_tokens": result.tokens}})


@router.get("/models", response_model=ModelList, responses=OPENAI_ERRORS, summary="List models")
async def list_models(server: ServerDep, caller: CallerDep) -> dict[str, Any]:
    """The backbone and the embedding tasks the caller may see."""
    return {"object": "list", "data": [_card(m) for m in embedding_models(server, caller)]}


@router.get("/models/{name}", response_model=ModelCard, responses=OPENAI_ERRORS, summary="Retrieve a model")
async def retrieve_model(server: ServerDep, name: TaskName, caller: CallerDep) -> dict[str, Any]:
    try:
        return _card(resolve(server, name, caller))
    except NotAnEmbeddingModel as err:  # a classification task is no model of this API: not found here
        raise HTTPException(404, str(err)) from None


def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector


def _card(model: EmbeddingModel) -> dict[str, Any]:
    created = 0 if model.created_at is None else int(datetime.fromisoformat(model.created_at).timestamp())
    return {"id": model.name, "object": "model", "created": created, "owned_by": "deltaserve"}

