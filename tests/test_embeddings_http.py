"""Embeddings over HTTP against a running uvicorn server: OpenAI's API through the real `openai` client,
TEI's `/embed`, `/tasks/{name}/predict`, the Open Inference Protocol through `tritonclient`, the Hugging
Face feature-extraction shape; every vector checked against the tests' independent reference, every bad
request in its protocol's error shape; embedding and classification rows in flight together."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import torch
import tritonclient.http as triton
from conftest import make_tiny_model
from delta_builders import NER_LABELS, build_delta
from http_helpers import ADMIN, live_server, settings

from adapters_store.format import parse_delta
from server.app import create_app
from server.backbone import Backbone
from tests.reference import ReferenceTask

TEXTS = ["a gripping, funny film about Paris", "Zürich café, nothing happens", "the plot, in one word: dull"]
TOLERANCE = 2e-4  # embedding deltas against the reference (issue 21)
MAX_CHARS = 400


class Served:
    def __init__(self, url: str, backbone: Backbone, pristine: torch.nn.Module, deltas: dict[str, bytes]) -> None:
        self.url = url
        self.backbone = backbone
        self.deltas = deltas
        self.refs = {name: ReferenceTask(pristine, parse_delta(data, backbone.spec())) for name, data in deltas.items()}
        self.refs[backbone.name] = ReferenceTask(pristine, parse_delta(
            build_delta(backbone, parts=(), task_type="embedding"), backbone.spec()))  # the bare backbone

    def reference(self, model: str, text: str | tuple[str, str]) -> np.ndarray:
        return self.refs[model].logits(self.backbone.encode([text])[0]).numpy()

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="s3cret", max_retries=0)


@pytest.fixture(scope="module")
def served(tokenizer, tmp_path_factory) -> Iterator[Served]:
    model = make_tiny_model("bert")
    pristine = copy.deepcopy(model)
    backbone = Backbone(model, tokenizer, "tiny-bert", device="cpu")
    deltas = {
        "emb": build_delta(backbone, parts=("lora", "pasta"), task_type="embedding", projection=16, seed=1),
        "emb-cls": build_delta(backbone, parts=("keep",), task_type="embedding", seed=2,
                               metadata={"pooling": "cls", "normalize": "false"}),
        "sst2": build_delta(backbone, parts=("lora",), metadata={"pooling": "mean"}, seed=3),
        "ner": build_delta(backbone, task_type="token-classification", labels=NER_LABELS, seed=4),
    }
    app = create_app(settings(tmp_path_factory.mktemp("store"), max_input_chars=MAX_CHARS, batch_wait_ms=20.0),
                     backbone=backbone)
    with live_server(app) as url:
        for name, data in deltas.items():
            httpx.put(f"{url}/tasks/{name}", content=data, headers=ADMIN).raise_for_status()
        served = Served(url, backbone, pristine, deltas)
        served.app = app  # type: ignore[attr-defined]
        yield served


# --------------------------------------------------------------------------- OpenAI


@pytest.mark.parametrize("model", ["emb", "emb-cls", "tiny-bert"])
def test_openai_client_embeddings_equal_the_reference(served, model):
    client = served.client()
    result = client.embeddings.create(model=model, input=TEXTS)  # the client asks for base64 and decodes it
    assert result.model == model and [d.index for d in result.data] == [0, 1, 2]
    for text, item in zip(TEXTS, result.data, strict=True):
        np.testing.assert_allclose(item.embedding, served.reference(model, text), atol=TOLERANCE, rtol=TOLERANCE)
    floats = client.embeddings.create(model=model, input=TEXTS, encoding_format="float")
    for a, b in zip(result.data, floats.data, strict=True):
        assert np.array_equal(np.float32(a.embedding), np.float32(b.embedding))  # the same float32 values
    tokens = sum(len(e.input_ids) for e in served.backbone.encode(TEXTS))
    assert (result.usage.prompt_tokens, result.usage.total_tokens) == (tokens, tokens)
    one = client.embeddings.create(model=model, input=TEXTS[1], encoding_format="float")
    np.testing.assert_allclose(one.data[0].embedding, floats.data[1].embedding, atol=1e-5)


def test_openai_vector_sizes_and_normalisation(served):
    client = served.client()
    sizes = {m: len(client.embeddings.create(model=m, input="x", encoding_format="float").data[0].embedding)
             for m in ("emb", "emb-cls", "tiny-bert")}
    assert sizes == {"emb": 16, "emb-cls": 32, "tiny-bert": 32}
    unit = client.embeddings.create(model="emb", input=TEXTS, encoding_format="float")
    assert all(abs(np.linalg.norm(d.embedding) - 1) < 1e-5 for d in unit.data)
    raw = client.embeddings.create(model="emb-cls", input=TEXTS, encoding_format="float")
    assert all(abs(np.linalg.norm(d.embedding) - 1) > 1e-3 for d in raw.data)  # normalize = false
    assert client.embeddings.create(model="emb", input="x", dimensions=16).data


def test_openai_models_list_the_backbone_and_the_embedding_tasks(served):
    client = served.client()
    assert [m.id for m in client.models.list()] == ["tiny-bert", "emb", "emb-cls"]
    card = client.models.retrieve("emb")
    assert card.id == "emb" and card.owned_by == "deltaserve" and card.created > 1_700_000_000
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("sst2")


def _openai_error(served: Served, **body: Any) -> tuple[int, dict[str, Any]]:
    response = httpx.post(f"{served.url}/v1/embeddings", json=body, headers=ADMIN)
    return response.status_code, response.json()


@pytest.mark.parametrize(("body", "status", "words"), [
    ({"model": "nope", "input": "hi"}, 404, "model 'nope' not found"),
    ({"model": "no/such-model", "input": "hi"}, 404, "not found"),
    ({"model": "sst2", "input": "hi"}, 422, "sequence-classification task, not an embedding model"),
    ({"model": "ner", "input": "hi"}, 422, "not an embedding model"),
    ({"model": "emb", "input": []}, 422, "input is empty"),
    ({"model": "emb", "input": ""}, 422, "input is an empty text"),
    ({"model": "emb", "input": ["ok", "  "]}, 422, "input[1] is an empty text"),
    ({"model": "emb", "input": [[101, 102]]}, 422, "token array"),
    ({"model": "emb", "input": "x" * (MAX_CHARS + 1)}, 413, f"the limit is {MAX_CHARS}"),
    ({"model": "tiny-bert", "input": ["ok", "x" * (MAX_CHARS + 1)]}, 413, "input"),
    ({"model": "emb", "input": "hi", "encoding_format": "int8"}, 422, "encoding_format"),
    ({"model": "emb", "input": "hi", "dimensions": 8}, 422, "16-dimensional"),
    ({"input": "hi"}, 422, "model is required"),
])
def test_openai_bad_requests_answer_openai_errors(served, body, status, words):
    code, answer = _openai_error(served, **body)
    assert code == status, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words in error["message"] and error["type"] == "invalid_request_error"
    if status == 404:
        assert (error["code"], error["param"]) == ("model_not_found", "model")


def test_openai_client_raises_its_own_errors(served):
    client = served.client()
    with pytest.raises(openai.NotFoundError) as missing:
        client.embeddings.create(model="nope", input="hi")
    assert missing.value.status_code == 404 and "not found" in missing.value.message
    with pytest.raises(openai.UnprocessableEntityError) as wrong:
        client.embeddings.create(model="sst2", input="hi")
    assert "not an embedding model" in wrong.value.message
    with pytest.raises(openai.APIStatusError) as too_long:
        client.embeddings.create(model="emb", input="x" * (MAX_CHARS + 1))
    assert too_long.value.status_code == 413


# --------------------------------------------------------------------------- TEI, predict, OIP, HF


def test_tei_embed_is_the_bare_backbone(served):
    answer = httpx.post(f"{served.url}/embed", json={"inputs": TEXTS}, headers=ADMIN)
    assert answer.status_code == 200
    vectors = np.array(answer.json())
    assert vectors.shape == (3, 32)
    for text, vector in zip(TEXTS, vectors, strict=True):
        np.testing.assert_allclose(vector, served.reference("tiny-bert", text), atol=TOLERANCE)
    single = httpx.post(f"{served.url}/embed", json={"inputs": TEXTS[0]}, headers=ADMIN).json()
    assert np.array(single).shape == (1, 32)  # TEI answers a list of vectors for one text too
    raw = np.array(httpx.post(f"{served.url}/embed", json={"inputs": TEXTS, "normalize": False},
                              headers=ADMIN).json())
    assert all(abs(np.linalg.norm(v) - 1) > 1e-3 for v in raw)
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), vectors, atol=1e-5)


@pytest.mark.parametrize(("body", "status", "words"), [
    ({"inputs": []}, 422, "inputs is empty"),
    ({"inputs": " "}, 422, "inputs is an empty text"),
    ({"inputs": "x" * (MAX_CHARS + 1)}, 413, f"the limit is {MAX_CHARS}"),
    ({"inputs": ["ok", "w " * 190]}, 413, "inputs[1] has 192 tokens, more than 128"),
    ({"inputs": "hi", "prompt_name": "query"}, 422, "prompt_name"),
    ({"inputs": "hi", "truncation_direction": "Left"}, 422, "truncation_direction"),
])
def test_tei_bad_requests_answer_tei_errors(served, body, status, words):
    response = httpx.post(f"{served.url}/embed", json=body, headers=ADMIN)
    assert response.status_code == status
    answer = response.json()
    assert set(answer) == {"error", "error_type"} and words in answer["error"]
    assert answer["error_type"] == "Validation"


def test_tei_truncates_when_asked(served):
    long = "w " * 190
    answer = httpx.post(f"{served.url}/embed", json={"inputs": long, "truncate": True}, headers=ADMIN)
    assert answer.status_code == 200
    truncated = served.backbone.tokenizer.decode(served.backbone.encode([long])[0].input_ids[1:-1])
    np.testing.assert_allclose(answer.json()[0], served.reference("tiny-bert", truncated), atol=TOLERANCE)


def test_predict_on_an_embedding_task_answers_vectors(served):
    inputs = [TEXTS[0], ["A man sleeps.", "Someone rests."]]
    answer = httpx.post(f"{served.url}/tasks/emb/predict", json={"inputs": [TEXTS[0]]}, headers=ADMIN).json()
    np.testing.assert_allclose(answer["predictions"][0]["embedding"], served.reference("emb", TEXTS[0]),
                               atol=TOLERANCE)
    pairs = httpx.post(f"{served.url}/tasks/emb/predict", json={"inputs": [inputs[1]]}, headers=ADMIN).json()
    np.testing.assert_allclose(pairs["predictions"][0]["embedding"],
                               served.reference("emb", ("A man sleeps.", "Someone rests.")), atol=TOLERANCE)
    info = httpx.get(f"{served.url}/tasks/emb", headers=ADMIN).json()
    assert (info["task_type"], info["labels"], info["pooling"], info["normalize"], info["embedding_size"]) == \
        ("embedding", [], "mean", True, 16)


@pytest.mark.parametrize("binary", [True, False])
def test_oip_infer_on_an_embedding_task_answers_fp32(served, binary):
    client = triton.InferenceServerClient(served.url.removeprefix("http://"))
    meta = client.get_model_metadata("emb")
    assert meta["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, 16]}]
    tensor = triton.InferInput("text", [len(TEXTS)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in TEXTS], dtype=object), binary_data=binary)
    result = client.infer("emb", [tensor], outputs=[triton.InferRequestedOutput("embedding", binary_data=binary)],
                          headers=dict(ADMIN))  # a copy: tritonclient adds its own headers to the dict it is given
    vectors = result.as_numpy("embedding")
    assert vectors.dtype == np.float32 and vectors.shape == (3, 16)
    for text, vector in zip(TEXTS, vectors, strict=True):
        np.testing.assert_allclose(vector, served.reference("emb", text), atol=TOLERANCE)


def test_hf_feature_extraction_on_an_embedding_task(served):
    single = httpx.post(f"{served.url}/models/emb", json={"inputs": TEXTS[0]}, headers=ADMIN).json()
    listed = httpx.post(f"{served.url}/models/emb", json={"inputs": TEXTS}, headers=ADMIN).json()
    assert np.array(single).shape == (16,) and np.array(listed).shape == (3, 16)
    np.testing.assert_allclose(single, listed[0], atol=1e-6)


# --------------------------------------------------------------------------- mixed in one forward


def test_embedding_and_classification_rows_share_forwards_under_concurrency(served):
    """Many clients at once: OpenAI, TEI and predict requests of every task type; every answer exact."""
    server = served.app.state.server
    batches: list[set[str]] = []
    run = server.runner.engine.run

    def recording_run(planned):
        if planned.batch is not None:
            batches.append({delta.meta.task_type for _, _, delta in planned.batch.segments})
        return run(planned)

    server.runner.engine.run = recording_run

    async def one(client: httpx.AsyncClient, i: int) -> None:
        text = TEXTS[i % len(TEXTS)] + f" #{i}"
        kind = i % 4
        if kind == 0:
            r = await client.post("/v1/embeddings", json={"model": "emb", "input": [text], "encoding_format": "float"})
            got, want = r.json()["data"][0]["embedding"], served.reference("emb", text)
        elif kind == 1:
            r = await client.post("/embed", json={"inputs": text})
            got, want = r.json()[0], served.reference("tiny-bert", text)
        elif kind == 2:
            r = await client.post("/tasks/emb-cls/predict", json={"inputs": text})
            got, want = r.json()["predictions"][0]["embedding"], served.reference("emb-cls", text)
        else:
            r = await client.post("/tasks/sst2/predict", json={"inputs": text})
            logits = r.json()["predictions"][0]["logits"]
            got, want = [logits["negative"], logits["positive"]], served.reference("sst2", text)
        np.testing.assert_allclose(got, want, atol=TOLERANCE, rtol=TOLERANCE)

    async def main() -> None:
        async with httpx.AsyncClient(base_url=served.url, headers=ADMIN, timeout=60) as client:
            await asyncio.gather(*(one(client, i) for i in range(48)))

    try:
        asyncio.run(main())
    finally:
        server.runner.engine.run = run
    assert any({"embedding", "sequence-classification"} <= kinds for kinds in batches), batches


def test_a_tenants_embedding_task_is_its_own(tiny_backbone, tmp_path):
    """A tenant sees the backbone and its own embedding tasks; another tenant's is unknown (404), as everywhere."""
    from http_helpers import served as served_app

    from server.tenants import key_hash

    tenants = tmp_path / "tenants.toml"
    tenants.write_text(f'[tenants.acme]\nkeys = ["sha256:{key_hash("acme-key")}"]\n\n'
                       f'[tenants.beta]\nkeys = ["sha256:{key_hash("beta-key")}"]\n')
    acme, beta = {"Authorization": "Bearer acme-key"}, {"Authorization": "Bearer beta-key"}
    with served_app(tiny_backbone, tmp_path / "store", tenants_file=tenants) as client:
        data = build_delta(tiny_backbone, task_type="embedding", seed=6)
        assert client.put("/tasks/acme-emb", content=data, headers=acme).status_code == 201
        models = {h["Authorization"]: [m["id"] for m in client.get("/v1/models", headers=h).json()["data"]]
                  for h in (acme, beta, ADMIN)}
        assert models == {acme["Authorization"]: ["tiny-bert", "acme-emb"], beta["Authorization"]: ["tiny-bert"],
                          ADMIN["Authorization"]: ["tiny-bert", "acme-emb"]}
        body = {"model": "acme-emb", "input": "hi"}
        assert client.post("/v1/embeddings", json=body, headers=acme).status_code == 200
        refused = client.post("/v1/embeddings", json=body, headers=beta)
        assert refused.status_code == 404 and refused.json()["error"]["code"] == "model_not_found"
        assert client.post("/v1/embeddings", json={"model": "tiny-bert", "input": "hi"}, headers=beta).is_success
        assert client.post("/embed", json={"inputs": "hi"}, headers=beta).is_success


@pytest.mark.parametrize(("route", "body", "field"), [
    ("/embed", {"inputs": "hi", "truncate": 0}, "truncate"),
    ("/embed", {"inputs": "hi", "normalize": "false"}, "normalize"),
    ("/v1/embeddings", {"model": "emb", "input": "hi", "dimensions": "16"}, "dimensions"),
    ("/v1/embeddings", {"model": "emb", "input": "hi", "dimensions": True}, "dimensions"),
])
def test_wrong_types_are_refused_not_coerced(served, route, body, field):
    response = httpx.post(f"{served.url}{route}", json=body, headers=ADMIN)
    assert response.status_code == 422 and field in response.text
