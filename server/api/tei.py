"""text-embeddings-inference's `POST /embed` on the bare backbone, so TEI's clients work unchanged.

Body: `inputs` (a text or a list of texts), `normalize` (default true: unit vectors, as
sentence-transformers' `normalize_embeddings=True`; false: the raw mean-pooled vectors),
`truncate` (default false, as TEI without `--auto-truncate`: an input longer than the server's
`max_length` tokens is refused with 413 rather than cut), `truncation_direction` (`Right` only).
Answer: one list of floats per input, a list of lists for a single text too, as TEI answers.
Errors answer TEI's `{"error": "<sentence>", "error_type": "Validation" | ...}` (see `server.api.errors`).
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException

from server.api.auth import CallerDep
from server.api.body import StrictJSONRoute
from server.api.deps import ServerDep
from server.api.schemas import require_text, require_texts
from server.embeddings import check_backbone_inputs, embed
from server.service import Server

router = APIRouter(tags=["text-embeddings-inference"], route_class=StrictJSONRoute)


class TeiError(BaseModel):
    error: str
    error_type: str


TEI_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": TeiError} for code in (401, 413, 422, 429, 503)}


class EmbedRequest(BaseModel):
    model_config = ConfigDict(strict=True)  # `"truncate": 0` is not false: a wrong type is 422, never coerced

    inputs: str | list[str] = Field(description="a text or a list of texts", examples=["What is Deep Learning?"])
    normalize: bool = Field(True, description="unit-length vectors (default), or the raw mean of the tokens")
    truncate: bool | None = Field(None, description="cut inputs over max_length tokens; default false: refuse (413)")
    truncation_direction: Literal["Right", "right"] = Field("Right", description="only Right is supported")
    prompt_name: str | None = Field(None, description="not supported: must be absent")

    @field_validator("inputs", mode="before")
    @classmethod
    def _texts(cls, value: Any) -> Any:
        return require_texts(value, "inputs", lambda item, where: require_text(
            item, where, "must be a text (token ids are not supported)"))


@router.post("/embed", response_model=list[list[float]], responses=TEI_ERRORS, summary="Embed (TEI)")
async def tei_embed(body: EmbedRequest, server: ServerDep, caller: CallerDep) -> Response:
    """The bare backbone's vector of each input: what `GET /backbone` names, mean-pooled."""
    if body.prompt_name is not None:
        raise HTTPException(422, "prompt_name is not supported: this server has no prompts")
    texts = [body.inputs] if isinstance(body.inputs, str) else list(body.inputs)
    if not body.truncate:
        await _refuse_over_long(server, texts)
    result = await embed(server, server.backbone.name, list(texts), normalize=body.normalize, caller=caller)
    return JSONResponse(result.vectors)


async def _refuse_over_long(server: Server, texts: list[str]) -> None:
    """413 for an input over `max_length` tokens, as TEI answers when it may not truncate."""
    check_backbone_inputs(server, list(texts))  # the character cap first: never tokenise a huge text
    limit = server.runner.max_length(None)
    counts = await server.tokenizer.run(lambda: [server.backbone.token_count(text) for text in texts])
    for i, count in enumerate(counts):
        if count > limit:
            where = "inputs" if len(texts) == 1 else f"inputs[{i}]"
            raise HTTPException(413, f"{where} has {count} tokens, more than {limit} (the server's max_length); "
                                     "send truncate: true to cut it")
