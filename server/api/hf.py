"""The Hugging Face Inference API shapes at `POST /models/{name}`, so that
`huggingface_hub.InferenceClient(model="http://host:8000/models/<task>")` works unchanged.

The client posts `{"inputs": ..., "parameters": {...}}` to that URL (the `hf-inference` provider
sends a URL model as is). The answers are those of the transformers pipelines:

- text classification: `[[{"label", "score"}, ...]]`, one inner list per input, best first;
  `top_k` keeps the k best, `function_to_apply` is `softmax` (default for several labels),
  `sigmoid` (default for one label) or `none` (the raw logits). A regression task answers its value
  as the score of its one label (`none` is its default: a sigmoid of a regression value means nothing).
- feature extraction (an embedding task): the vector of a single text, a list of vectors for a list;
- token classification: `[{"entity_group", "score", "word", "start", "end"}, ...]` per input;
  `aggregation_strategy` `simple` (default) or `first` merges B-/I- runs into entities, `none`
  answers each word with `entity`; `average` and `max` are refused (this server labels a word from
  one of its sub-tokens, the delta's `word_piece`, and keeps no per-sub-token scores);
  `ignore_labels` (default `["O"]`) drops labels or entity groups. `stride` is the overlap, in
  tokens, of the windows a long text is cut into (server.windows; default a quarter window).

A single text answers the pipeline's single-input shape, a list the list of those. Errors answer
`{"error": "<sentence>"}` like the Inference API (see `server.api.errors`).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException

from adapters_store.store import TaskInfo
from server.api.auth import CallerDep
from server.api.body import StrictJSONRoute
from server.api.deps import ServerDep, TaskName
from server.backbone import TextInput
from server.postprocess import Prediction, UnsupportedInput

router = APIRouter(tags=["hugging face inference api"], route_class=StrictJSONRoute)


class TextPair(BaseModel):
    text: str
    text_pair: str


class HfParameters(BaseModel):
    # Strict: `stride: false` or `top_k: true` are not numbers (lax mode read them as 0 and 1).
    model_config = ConfigDict(extra="forbid", strict=True)

    top_k: int | None = Field(None, ge=1, description="text classification: keep the k best labels")
    function_to_apply: Literal["softmax", "sigmoid", "none"] | None = Field(
        None, description="text classification: softmax, sigmoid or none (raw logits)")
    aggregation_strategy: Literal["none", "simple", "first", "average", "max"] | None = Field(
        None, description="token classification: simple/first merge entities, none answers each word")
    ignore_labels: list[str] | None = Field(None, description='token classification: labels to drop (default ["O"])')
    stride: int | None = Field(None, ge=0,
                               description="token classification: overlap in tokens of a long text's windows")


class HfRequest(BaseModel):
    inputs: str | TextPair | list[str] | list[TextPair] = Field(
        description="a text, a {text, text_pair} pair, or a list of either")
    parameters: HfParameters = Field(default_factory=HfParameters)
    options: dict[str, Any] = Field(default_factory=dict, description="the Inference API's options; ignored")

    @field_validator("inputs", mode="before")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("inputs is empty")
        return value


class LabelScore(BaseModel):
    label: str
    score: float


class TokenEntity(BaseModel):
    entity_group: str | None = None
    entity: str | None = None
    score: float
    word: str
    start: int
    end: int


# Examples (request and answers) are in server/api/examples.py with the others.
HF_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": dict[str, str]} for code in (400, 401, 403, 404, 409, 413, 429, 503)
}


HfAnswer = list[list[LabelScore]] | list[TokenEntity] | list[list[TokenEntity]] | list[float] | list[list[float]]


@router.post("/models/{name}", response_model=HfAnswer, responses=HF_RESPONSES,
             summary="Hugging Face Inference API (text and token classification, feature extraction)")
async def hf_inference(body: HfRequest, server: ServerDep, name: TaskName, caller: CallerDep) -> Response:
    """`InferenceClient(model=".../models/<task>").text_classification(...)` or `.token_classification(...)`."""
    info = server.task(name, caller)
    single = not isinstance(body.inputs, list)
    items = [body.inputs] if single else list(body.inputs)
    inputs: list[TextInput] = [(i.text, i.text_pair) if isinstance(i, TextPair) else i for i in items]
    for i, text in enumerate(inputs):
        if not all(part.strip() for part in ([text] if isinstance(text, str) else text)):
            raise HTTPException(422, "inputs is an empty text" if single else f"inputs[{i}] has an empty text")
    params = body.parameters
    if info.task_type == "embedding":  # the feature-extraction pipeline of a sentence encoder: one vector per input
        _, answer = await server.predict(name, inputs, caller=caller)
        vectors = [p["embedding"] for p in answer.predictions]
        return JSONResponse(vectors[0] if single else vectors)
    if info.task_type == "token-classification":
        strategy = params.aggregation_strategy or "simple"
        if strategy in ("average", "max"):
            raise UnsupportedInput(f"aggregation_strategy {strategy!r} is not supported: this server labels each "
                                   "word from one sub-token; use 'simple', 'first' or 'none'")
        _, answer = await server.predict(name, inputs, params.stride, caller)
        ignore = set(params.ignore_labels if params.ignore_labels is not None else ["O"])
        tokens = [_token_answer(p, strategy, ignore) for p in answer.predictions]
        return JSONResponse(tokens[0] if single else tokens)
    _, answer = await server.predict(name, inputs, caller=caller)
    labels = [_label_scores(p, info, params) for p in answer.predictions]
    return JSONResponse(labels)  # one inner list per input, for a single text too (as the pipeline answers)


def _label_scores(prediction: Prediction, info: TaskInfo, params: HfParameters) -> list[dict[str, Any]]:
    if "value" in prediction:  # regression: its value is the one label's score
        if params.function_to_apply not in (None, "none"):
            raise UnsupportedInput(f"function_to_apply {params.function_to_apply!r} does not apply to a regression "
                                   "task: its value is returned raw")
        return [{"label": info.labels[0], "score": prediction["value"]}]
    function = params.function_to_apply or ("sigmoid" if len(info.labels) == 1 else "softmax")
    if function == "softmax":
        scores = prediction["scores"]  # exactly /predict's probabilities
    else:
        logits = np.array(list(prediction["logits"].values()), dtype=np.float64)
        values = 1 / (1 + np.exp(-logits)) if function == "sigmoid" else logits
        scores = dict(zip(prediction["logits"], values.tolist(), strict=True))
    ranked = sorted(scores.items(), key=lambda item: item[1], reverse=True)
    return [{"label": label, "score": score} for label, score in ranked[:params.top_k]]


def _token_answer(prediction: Prediction, strategy: str, ignore: set[str]) -> list[dict[str, Any]]:
    if strategy == "none":
        return [{"entity": t["label"], "score": t["score"], "word": t["word"], "start": t["start"], "end": t["end"]}
                for t in prediction["tokens"] if t["label"] not in ignore]
    return [{"entity_group": e["label"], "score": e["score"], "word": e["text"], "start": e["start"], "end": e["end"]}
            for e in prediction["entities"] if e["label"] not in ignore]
