"""Regression tests of issue 8: what fuzzing, faults and load broke, each answered with a clear 4xx now.

(The pair-length blow-up's cost is measured in test_tokenize_limits.py; empty tokens in
test_settings_tokens.py; the keep-alive after a 500 against real uvicorn in test_keepalive.py.)
"""

from __future__ import annotations

import gzip
import io
import json
import struct

import numpy as np
import pytest
import torch
from delta_builders import NER_LABELS, build_delta
from http_helpers import ADMIN, served

from server.backbone import EncodedText
from server.postprocess import NonFiniteOutput, predict_row


def store_files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture
def client(tiny_backbone, tmp_path):
    with served(tiny_backbone, tmp_path, max_input_chars=5000) as client:
        assert client.put("/tasks/seq", content=build_delta(tiny_backbone), headers=ADMIN).status_code == 201
        ner = build_delta(tiny_backbone, task_type="token-classification", labels=NER_LABELS)
        assert client.put("/tasks/ner", content=ner, headers=ADMIN).status_code == 201
        yield client


def detail(response) -> str:
    return response.json()["detail"]


def test_a_text_over_the_character_cap_is_413_before_tokenising(client):
    response = client.post("/tasks/seq/predict", json={"inputs": [["word " * 50_000, "other " * 50_000]]})
    assert response.status_code == 413 and "inputs[0][0]" in detail(response) and "5000" in detail(response)
    response = client.post("/tasks/seq/predict", json={"inputs": ["fine", "x" * 5001]})
    assert response.status_code == 413 and "inputs[1]" in detail(response)
    # At the cap, a pair is answered (its cost is linear: see test_tokenize_limits.py).
    response = client.post("/tasks/seq/predict", json={"inputs": [["word " * 1000, "other " * 800]]})
    assert response.status_code == 200


@pytest.mark.parametrize(("task", "inputs", "where"), [
    ("seq", "\ud800", "inputs"),
    ("seq", ["ok", "a\udfffb"], "inputs[1]"),
    ("seq", [["ok", "\ud83d"]], "inputs[0][1]"),
    ("ner", "Paris \ud800", "inputs"),
])
def test_lone_surrogates_are_422(client, task, inputs, where):
    body = json.dumps({"inputs": inputs})  # ASCII JSON: "\\ud800" escapes, as a client would send them
    response = client.post(f"/tasks/{task}/predict", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and "surrogate" in detail(response) and where in detail(response)


def test_raw_surrogate_bytes_and_bad_bodies_are_422(client):
    headers = {"Content-Type": "application/json"}
    cases = [
        (b'{"inputs": "\xed\xa0\x80"}', {}, "UTF-8"),
        ('{"inputs": "café"}'.encode("latin-1"), {}, "UTF-8"),
        (gzip.compress(b'{"inputs": "fine"}'), {}, "UTF-8"),
        (gzip.compress(b'{"inputs": "fine"}'), {"Content-Encoding": "gzip"}, "Content-Encoding"),
        (b'{"inputs": ' + b"[" * 1500 + b"]" * 1500 + b"}", {}, "nested"),
        (b"[" * 100_000, {}, "nested"),
        (b'{"inputs": [[[[["deep"]]]]]}', {}, "inputs"),
    ]
    for body, extra, word in cases:
        response = client.post("/tasks/seq/predict", content=body, headers={**headers, **extra})
        assert response.status_code == 422, (body[:40], response.text)
        assert word in detail(response), (body[:40], detail(response))
    assert client.post("/tasks/seq/predict", json={"inputs": "still serving"}).status_code == 200


def nested_header_delta(data: bytes, depth: int) -> bytes:
    """`data` with a key nested `depth` levels deep added to its safetensors header."""
    (length,) = struct.unpack("<Q", data[:8])
    header = data[8:8 + length].decode().rstrip()
    assert header.endswith("}")
    deep = "[" * depth + "]" * depth
    new_header = (header[:-1] + f', "deep": {deep}}}').encode()
    new_header += b" " * (-len(new_header) % 8)
    return struct.pack("<Q", len(new_header)) + new_header + data[8 + length:]


def test_deep_json_and_huge_values_in_deltas_are_refused_naming_the_key(tiny_backbone, tmp_path):
    bb = tiny_backbone
    d = bb.hidden_size
    cases = [
        ("deep header", nested_header_delta(build_delta(bb), 5000), "nested too deeply"),
        ("deep labels", build_delta(bb, metadata={"labels": "[" * 5000 + "]" * 5000}), "labels"),
        ("huge classifier", build_delta(bb, extra={"head.classifier.weight": torch.full((2, d), 3e38)}),
         "head.classifier.weight"),
        ("huge token classifier", build_delta(bb, task_type="token-classification", labels=NER_LABELS,
                                              extra={"head.classifier.bias": torch.full((9,), 1e6)}),
         "head.classifier.bias"),
        ("huge pooler", build_delta(bb, pooler_head=True, extra={"head.pooler.weight": torch.full((d, d), 1e6)}),
         "head.pooler.weight"),
        ("huge regression", build_delta(bb, labels=["score"], problem_type="regression",
                                        extra={"head.classifier.weight": torch.full((1, d), -3e38)}),
         "head.classifier.weight"),
        ("huge lora", build_delta(bb, extra={"encoder.layer.0.attention.self.query.lora_B": torch.full((d, 2), 1e9)}),
         "encoder.layer.0.attention.self.query.lora_B"),
    ]
    with served(bb, tmp_path) as client:
        before = store_files(tmp_path)
        for case, data, word in cases:
            response = client.put("/tasks/bad", content=data, headers=ADMIN)
            assert response.status_code == 422, (case, response.text)
            assert word in detail(response), (case, detail(response))
        assert store_files(tmp_path) == before and client.get("/tasks").json()["tasks"] == []
        assert client.put("/tasks/good", content=build_delta(bb), headers=ADMIN).status_code == 201
        assert client.post("/tasks/good/predict", json={"inputs": "still serving"}).status_code == 200


def test_non_finite_logits_are_a_clear_error_not_invalid_json(tiny_backbone):
    from adapters_store.format import DeltaMeta

    meta = DeltaMeta(method="lora", task_type="sequence-classification", labels=("a", "b"),
                     backbone_fingerprint="x")
    text = EncodedText([101, 102], None, [(0, 0), (0, 0)], [None, None], [None, None])
    with pytest.raises(NonFiniteOutput, match="not finite"):
        predict_row(np.array([np.inf, 0.0], dtype=np.float32), meta, text, "x")
    assert predict_row(np.array([1e30, 0.0], dtype=np.float32), meta, text, "x")["label"] == "a"


def test_two_multipart_file_parts_are_refused(client, tiny_backbone):
    data = build_delta(tiny_backbone, seed=3)
    files = [("file", ("a.safetensors", io.BytesIO(data))), ("file", ("b.safetensors", io.BytesIO(data)))]
    response = client.put("/tasks/seq", files=files, headers=ADMIN)
    assert response.status_code == 422 and "2 'file' parts" in detail(response)
    assert client.get("/tasks/seq").json()["version"] == 1


def test_methods_options_head_and_405(client):
    response = client.options("/tasks/seq")
    assert response.status_code == 204
    assert set(response.headers["allow"].split(", ")) == {"GET", "HEAD", "PUT", "DELETE", "OPTIONS"}
    response = client.post("/tasks/seq")
    assert response.status_code == 405 and "PUT" in response.headers["allow"] and "POST" in detail(response)
    for path in ("/tasks", "/tasks/seq", "/health", "/backbone"):
        get, head = client.get(path), client.head(path)
        assert head.status_code == 200 == get.status_code and head.content == b"", path
        assert head.headers["content-length"] == get.headers["content-length"]
    assert client.head("/tasks/nope").status_code == 404
    assert client.options("/nowhere").status_code == 404


def test_openapi_documents_the_task_name_rule(client):
    schema = client.get("/openapi.json").json()
    for path, ops in schema["paths"].items():
        for op in ops.values():
            for param in op.get("parameters", []):
                if param["name"] == "name":
                    assert param["schema"]["pattern"].startswith("^[A-Za-z0-9]"), path
                    assert param["schema"]["minLength"] == 1, path


def test_api_key_guards_predict_and_reads_not_health(tiny_backbone, tmp_path):
    with served(tiny_backbone, tmp_path, api_key="reader") as client:
        assert client.put("/tasks/seq", content=build_delta(tiny_backbone), headers=ADMIN).status_code == 201
        for method, path in (("post", "/tasks/seq/predict"), ("get", "/tasks"), ("get", "/tasks/seq"),
                             ("get", "/backbone"), ("get", "/memory")):
            kwargs = {"json": {"inputs": "hi"}} if method == "post" else {}
            assert getattr(client, method)(path, **kwargs).status_code == 401, path
            for token in ("reader", "s3cret"):  # the API key, or the admin token
                ok = getattr(client, method)(path, headers={"Authorization": f"Bearer {token}"}, **kwargs)
                assert ok.status_code == 200, (path, token)
        assert client.get("/health").status_code == 200
        wrong = client.put("/tasks/x", content=b"x", headers={"Authorization": "Bearer reader"})
        assert wrong.status_code == 401  # the API key is not an admin token


def test_schema_lists_every_status_it_answers(client):
    schema = json.dumps(client.get("/openapi.json").json())
    assert '"401"' in schema and '"413"' in schema and '"422"' in schema
