"""Request and response models of the HTTP API (docs/http-api.md): FastAPI builds the OpenAPI schema
from these, so their descriptions and examples are the API's documentation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from pydantic import BaseModel, Field, field_validator

from adapters_store.store import TaskInfo
from server.backbone import InvalidText, check_text

# A text with something besides whitespace. The schema documents the rule (so a fuzzer's "valid" texts
# are valid); `PredictRequest._shape` enforces it with a message naming the input.
Text = Annotated[str, Field(min_length=1, json_schema_extra={"pattern": r"\S"})]
Texts = Annotated[list[Text], Field(min_length=1)]
Pairs = Annotated[list[tuple[Text, Text]], Field(min_length=1)]


def require_text(item: Any, where: str, not_text: str) -> None:
    """One input text: a string with something besides whitespace that the tokenizer takes; else a
    ValueError naming `where` (pydantic answers it as a 422). `not_text` says what a non-string should be."""
    if not isinstance(item, str):
        raise ValueError(f"{where} {not_text}")
    if not item.strip():
        raise ValueError(f"{where} is an empty text")
    try:
        check_text(item, where)
    except InvalidText as err:
        raise ValueError(str(err)) from None


def require_texts(value: Any, field: str, text: Callable[[Any, str], None]) -> Any:
    """A text or a non-empty list of texts (the embedding protocols' `input`/`inputs`), each checked by `text`."""
    if isinstance(value, list):
        if not value:
            raise ValueError(f"{field} is empty")
        for i, item in enumerate(value):
            text(item, f"{field}[{i}]")
    else:
        text(value, field)
    return value


class PredictRequest(BaseModel):
    inputs: Text | Texts | Pairs = Field(
        description="one text, a list of texts, or a list of [text_a, text_b] pairs",
        examples=["a gripping, funny film", ["great", "awful"], [["A man sleeps.", "Someone rests."]]],
    )

    @field_validator("inputs", mode="before")
    @classmethod
    def _shape(cls, value: Any) -> Any:
        # One readable message instead of pydantic's error per union branch.
        def text(item: Any, where: str) -> None:
            require_text(item, where, "must be a text, a list of texts or a list of [text_a, text_b] pairs")

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
    scores: dict[str, float] = Field(description="softmax probability of every label")
    logits: dict[str, float] = Field(description="the head's raw output for every label, before the softmax")


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


class EmbeddingPrediction(BaseModel):
    embedding: list[float] = Field(description="an embedding task's vector (float32 values)")


class PredictResponse(BaseModel):
    task: str
    version: int
    predictions: list[SequencePrediction | RegressionPrediction | TokenPrediction | EmbeddingPrediction]


class TaskList(BaseModel):
    tasks: list[TaskInfo]  # the store's dataclass: its fields are the documented schema


class MemoryTask(BaseModel):
    name: str
    method: str
    delta_bytes: int
    head_bytes: int


class ResidentDelta(BaseModel):
    name: str
    version: int
    bytes: int


class TenantUsage(BaseModel):
    name: str
    tasks: int
    delta_bytes: int
    max_tasks: int | None
    max_delta_bytes: int | None
    weight: float


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
    resident: list[ResidentDelta] = Field(default_factory=list,
                                          description="the prepared deltas this process (replica) holds now")
    replica: str | None = Field(None, description="which replica answered (Ray Serve), else null")
    tenants: list[TenantUsage] | None = Field(None, description="with --tenants-file: the caller's usage and "
                                                               "quotas (the operator: every tenant's), else null")
    backend: str | None = Field(None, description="the engine backend serving: triton (grouped kernels) or cpu "
                                "(the formula in torch ops, on the CPU or the GPU)")
    backend_reason: str | None = Field(None, description="why that backend: requested, auto, or a fallback's cause")


class ErrorBody(BaseModel):
    detail: str


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (401, 403, 404, 409, 413, 422, 429, 503)
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
