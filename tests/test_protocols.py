"""The standard protocols through their real clients against a running uvicorn server: the Open Inference
Protocol v2 through `tritonclient[http]` (binary and JSON tensors), the Hugging Face Inference API shapes
through `huggingface_hub.InferenceClient`. Every answer is checked against `POST /tasks/{name}/predict`."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from conftest import make_tiny_backbone
from delta_builders import NER_LABELS, build_delta
from http_helpers import ADMIN, assert_close, live_server, settings
from huggingface_hub import InferenceClient
from huggingface_hub.errors import HfHubHTTPError
from tritonclient.utils import InferenceServerException

from server.app import create_app

TEXTS = ["a gripping, funny film about Paris", "Zürich café, nothing happens", "the plot, in one word: dull"]
PAIRS = [("A man sleeps in Berlin.", "Someone rests."), ("It rains.", "The sun shines on Rome.")]


@pytest.fixture(scope="module")
def url(tokenizer, tmp_path_factory) -> Iterator[str]:
    backbone = make_tiny_backbone(tokenizer)
    deltas = {
        "sst2": build_delta(backbone, parts=("lora", "keep")),
        "mrpc": build_delta(backbone, labels=("not_equivalent", "equivalent"), pooler_head=True, seed=1),
        "stsb": build_delta(backbone, labels=("similarity",), problem_type="regression", seed=2),
        "ner": build_delta(backbone, task_type="token-classification", labels=NER_LABELS, seed=3),
    }
    with live_server(create_app(settings(tmp_path_factory.mktemp("store")), backbone=backbone)) as base:
        for name, data in deltas.items():
            httpx.put(f"{base}/tasks/{name}", content=data, headers=ADMIN).raise_for_status()
        yield base


def predict(url: str, task: str, inputs: Any) -> list[dict[str, Any]]:
    response = httpx.post(f"{url}/tasks/{task}/predict", json={"inputs": inputs})
    response.raise_for_status()
    return response.json()["predictions"]


def text_input(name: str, texts: list[str], binary: bool) -> triton.InferInput:
    tensor = triton.InferInput(name, [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object), binary_data=binary)
    return tensor


# --------------------------------------------------------------------------- Open Inference Protocol v2


@pytest.mark.parametrize("binary", [True, False])
def test_oip_sequence_classification_equals_predict(url, binary):
    client = triton.InferenceServerClient(url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("sst2") and not client.is_model_ready("nope")
    meta = client.get_model_metadata("sst2")
    assert meta["name"] == "sst2" and meta["versions"] == ["1"]
    assert meta["parameters"]["labels"] == ["negative", "positive"]
    assert [o["name"] for o in meta["outputs"]] == ["label", "score", "probabilities"]

    outputs = None if binary else [triton.InferRequestedOutput(n, binary_data=False)
                                   for n in ("label", "score", "probabilities")]
    result = client.infer("sst2", [text_input("text", TEXTS, binary)], outputs=outputs, request_id="r-1")
    expected = predict(url, "sst2", TEXTS)
    assert result.get_response()["model_version"] == "1" and result.get_response()["id"] == "r-1"
    labels = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("label")]
    assert labels == [p["label"] for p in expected]
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (len(TEXTS), 2) and probabilities.dtype == np.float64
    assert_close(probabilities.tolist(), [[p["scores"]["negative"], p["scores"]["positive"]] for p in expected])
    assert_close(result.as_numpy("score").tolist(), [p["score"] for p in expected])


def test_oip_pairs_regression_and_entities_equal_predict(url):
    client = triton.InferenceServerClient(url.removeprefix("http://"))
    first, second = zip(*PAIRS, strict=True)
    result = client.infer("mrpc", [text_input("text", list(first), True), text_input("text_pair", list(second), True)],
                          model_version="1")
    expected = predict(url, "mrpc", [list(p) for p in PAIRS])
    assert [v.decode() for v in result.as_numpy("label")] == [p["label"] for p in expected]
    assert_close(result.as_numpy("score").tolist(), [p["score"] for p in expected])

    result = client.infer("stsb", [text_input("text", list(first), True), text_input("text_pair", list(second), True)])
    expected = predict(url, "stsb", [list(p) for p in PAIRS])
    assert_close(result.as_numpy("value").tolist(), [p["value"] for p in expected])

    result = client.infer("ner", [text_input("text", TEXTS, True)])
    expected = predict(url, "ner", TEXTS)
    assert_close([json.loads(v) for v in result.as_numpy("entities")], [p["entities"] for p in expected])
    assert_close([json.loads(v) for v in result.as_numpy("tokens")], [p["tokens"] for p in expected])
    assert sum(len(p["entities"]) for p in expected) > 0  # the comparison saw entities


def test_oip_errors_follow_the_protocol(url):
    client = triton.InferenceServerClient(url.removeprefix("http://"))
    with pytest.raises(InferenceServerException) as err:
        client.infer("nope", [text_input("text", TEXTS, True)])
    assert err.value.status() == "404" and "nope" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        client.infer("sst2", [text_input("sentence", TEXTS, True)])
    assert err.value.status() == "400" and "'sentence'" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        client.infer("sst2", [text_input("text", TEXTS, True)], model_version="7")
    assert err.value.status() == "404" and "version 1" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        client.infer("ner", [text_input("text", TEXTS[:1], True), text_input("text_pair", TEXTS[:1], True)])
    assert err.value.status() == "400" and "single texts" in err.value.message()

    bad = [
        ({"inputs": [{"name": "text", "shape": [1], "datatype": "FP32", "data": [1.0]}]}, "must be BYTES"),
        ({"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["one"]}]}, "shape [2]"),
        ({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["  "]}]}, "empty text"),
        ({"inputs": "text"}, "inputs"),
        ({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["x"]}],
          "outputs": [{"name": "logits"}]}, "unknown output 'logits'"),
    ]
    for body, words in bad:
        response = httpx.post(f"{url}/v2/models/sst2/infer", json=body)
        assert response.status_code == 400 and words in response.json()["error"], (body, response.text)
    response = httpx.post(f"{url}/v2/models/sst2/infer", content=b'{"inputs": []}xxxx',
                          headers={"Inference-Header-Content-Length": "14"})
    assert response.status_code == 400 and "belong to no input" in response.json()["error"]
    response = httpx.get(f"{url}/v2/models/nope")
    assert response.status_code == 404 and "nope" in response.json()["error"]
    assert "detail" in httpx.get(f"{url}/tasks/nope").json()  # the native API keeps its own shape


# --------------------------------------------------------------------------- Hugging Face Inference API shapes


def test_hf_text_classification_equals_predict(url):
    client = InferenceClient(model=f"{url}/models/sst2")
    (expected,) = predict(url, "sst2", TEXTS[0])
    answer = client.text_classification(TEXTS[0])
    ranked = sorted(expected["scores"].items(), key=lambda item: item[1], reverse=True)
    assert_close([[a.label, a.score] for a in answer], ranked)  # all labels, best first, /predict's scores
    (best,) = client.text_classification(TEXTS[0], top_k=1)
    assert_close([best.label, best.score], [expected["label"], expected["score"]])
    logits = expected["logits"]
    raw = client.text_classification(TEXTS[0], function_to_apply="none")
    assert_close({a.label: a.score for a in raw}, logits)
    sigmoid = client.text_classification(TEXTS[0], function_to_apply="sigmoid", top_k=2)
    assert_close({a.label: a.score for a in sigmoid}, {k: 1 / (1 + math.exp(-v)) for k, v in logits.items()})

    (expected,) = predict(url, "stsb", [list(PAIRS[0])])
    response = httpx.post(f"{url}/models/stsb", json={"inputs": {"text": PAIRS[0][0], "text_pair": PAIRS[0][1]}})
    assert_close(response.json(), [[{"label": "similarity", "score": expected["value"]}]])


def test_hf_token_classification_equals_predict(url):
    client = InferenceClient(model=f"{url}/models/ner")
    (expected,) = predict(url, "ner", TEXTS[0])
    entities = client.token_classification(TEXTS[0])
    assert entities and [(e.entity_group, e.word, e.start, e.end) for e in entities] == \
        [(e["label"], e["text"], e["start"], e["end"]) for e in expected["entities"]]
    assert_close([e.score for e in entities], [e["score"] for e in expected["entities"]])
    words = client.token_classification(TEXTS[0], aggregation_strategy="none")
    assert [(w.entity, w.word, w.start) for w in words] == \
        [(t["label"], t["word"], t["start"]) for t in expected["tokens"] if t["label"] != "O"]
    dropped = expected["entities"][0]["label"]
    kept = client.token_classification(TEXTS[0], ignore_labels=[dropped])
    assert [e.entity_group for e in kept] == [e["label"] for e in expected["entities"] if e["label"] != dropped]

    with pytest.raises(HfHubHTTPError) as err:
        client.token_classification(TEXTS[0], aggregation_strategy="max")
    assert err.value.response.status_code == 400 and "aggregation_strategy 'max'" in err.value.response.json()["error"]
    with pytest.raises(HfHubHTTPError) as err:
        InferenceClient(model=f"{url}/models/nope").text_classification("x")
    assert err.value.response.status_code == 404
    response = httpx.post(f"{url}/models/sst2", json={"inputs": ["fine", " "]})
    assert response.status_code == 400 and response.json() == {"error": "inputs[1] has an empty text"}
    response = httpx.post(f"{url}/models/sst2", json={"inputs": "x", "parameters": {"top_k": 0}})
    assert response.status_code == 400 and "top_k" in response.json()["error"]
