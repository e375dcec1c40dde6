"""Embedding models, for the protocols that speak of models rather than tasks (OpenAI, TEI).

An embedding model is either the bare backbone, under the name `GET /backbone` reports (mean
pooled and normalised: for all-MiniLM-L6-v2 its own sentence-transformers encoding), or a
stored task of type `embedding`. Both run through the same batcher as every task, so their
rows share forwards with classification rows. Nothing here knows about HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass

from adapters_store.store import InvalidTaskName, TaskNotFound
from server.batching import TextInput
from server.delta import BACKBONE_TASK, BACKBONE_TASK_UNNORMALISED
from server.service import Server, TooManyInputs, check_inputs
from server.tenants import OPERATOR, Caller


class UnknownModel(LookupError):
    """No embedding model has this name (404)."""

    def __init__(self, name: str, known: list[str]) -> None:
        shown = ", ".join(repr(n) for n in known[:10]) + (", ..." if len(known) > 10 else "")
        super().__init__(f"model {name!r} not found; this server's embedding models are {shown} (GET /v1/models)")


class NotAnEmbeddingModel(ValueError):
    """A classification task named where an embedding model is wanted (422)."""


@dataclass(frozen=True)
class EmbeddingModel:
    name: str
    dimensions: int
    version: int  # 0 for the bare backbone
    created_at: str | None  # when this version was stored; None for the backbone
    description: str


@dataclass(frozen=True)
class Embeddings:
    model: str
    version: int
    vectors: list[list[float]]  # float32 values, one vector per input, in the inputs' order
    tokens: int  # tokens the inputs ran with, special tokens included


def backbone_model(server: Server) -> EmbeddingModel:
    backbone = server.backbone
    return EmbeddingModel(backbone.name, backbone.hidden_size, 0, None,
                          f"the bare backbone {backbone.name}: mean-pooled, normalised")


def embedding_models(server: Server, caller: Caller = OPERATOR) -> list[EmbeddingModel]:
    """The backbone first, then the embedding tasks `caller` may see, by name."""
    models = [backbone_model(server)]
    for info in sorted(server.tasks(caller), key=lambda i: i.name):
        if info.task_type == "embedding":
            models.append(EmbeddingModel(info.name, info.embedding_size or server.backbone.hidden_size,
                                         info.version, info.created_at, info.description))
    return models


def resolve(server: Server, name: str, caller: Caller = OPERATOR) -> EmbeddingModel:
    """The embedding model called `name`; `UnknownModel` (404) or `NotAnEmbeddingModel` (422) otherwise.

    The backbone's name means the backbone, even if a task has the same name (that task stays
    reachable at /tasks/{name}/predict). A task `caller` may not see is unknown, as everywhere.
    """
    if name == server.backbone.name:
        return backbone_model(server)
    try:
        info = server.task(name, caller)
    except (TaskNotFound, InvalidTaskName):
        raise UnknownModel(name, [m.name for m in embedding_models(server, caller)]) from None
    if info.task_type != "embedding":
        raise NotAnEmbeddingModel(f"task {name!r} is a {info.task_type} task, not an embedding model: "
                                  f"ask it at POST /tasks/{name}/predict")
    return EmbeddingModel(name, info.embedding_size or server.backbone.hidden_size, info.version, info.created_at,
                          info.description)


def check_backbone_inputs(server: Server, inputs: list[TextInput]) -> None:
    """The checks `Server.predict` makes for a task, before any tokenising: count, characters, Unicode."""
    if len(inputs) > server.settings.max_inputs:
        raise TooManyInputs(f"{len(inputs)} inputs in one request; the limit is {server.settings.max_inputs}")
    check_inputs(inputs, server.settings.max_input_chars)


async def embed(server: Server, name: str, inputs: list[TextInput], normalize: bool = True,
                caller: Caller = OPERATOR) -> Embeddings:
    """One vector per input (a text or a pair) from the model called `name`, in the mixed batch.

    `normalize=False` is for the bare backbone only (TEI's `/embed`): a task's delta decides its own.
    """
    model = resolve(server, name, caller)
    if model.version == 0:
        check_backbone_inputs(server, inputs)
        key = BACKBONE_TASK if normalize else BACKBONE_TASK_UNNORMALISED
        answer = await server.batcher.predict(key, inputs, server.runner.max_length(None), caller.tenant)
    else:
        try:
            _, answer = await server.predict(name, inputs, caller=caller)
        except TaskNotFound:  # deleted since `resolve`
            raise UnknownModel(name, [m.name for m in embedding_models(server, caller)]) from None
    if not all("embedding" in p for p in answer.predictions):  # replaced by a classifier since `resolve`
        raise NotAnEmbeddingModel(f"task {name!r} is no longer an embedding model")
    return Embeddings(model.name, answer.version, [p["embedding"] for p in answer.predictions], answer.tokens)
