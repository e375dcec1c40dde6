"""Every client mistake of the spec answers the right 4xx with a readable detail, and stores nothing."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_backbone
from delta_builders import build_delta
from http_helpers import ADMIN, served


def store_files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def bad_deltas(bb):
    """(case, bytes, status, a word the detail must contain)."""
    return [
        ("not safetensors", b"\x00\x01garbage", 422, "safetensors"),
        ("truncated", build_delta(bb)[:-10], 422, "file"),
        ("another backbone", build_delta(make_tiny_backbone(bb.tokenizer, seed=9)), 409, "backbone"),
        ("wrong shape", build_delta(bb, extra={"encoder.layer.0.attention.self.query.lora_A": torch.zeros(2, 31),
                                               "encoder.layer.0.attention.self.query.lora_B": torch.zeros(32, 2)}),
         422, "encoder.layer.0.attention.self.query.lora_A"),
        ("nan", build_delta(bb, extra={"head.classifier.bias": torch.tensor([0.0, float("nan")])}),
         422, "head.classifier.bias"),
        ("unknown module", build_delta(bb, extra={"encoder.layer.9.nope.lora_A": torch.zeros(1, 32)}),
         422, "encoder.layer.9.nope"),
        ("unknown key", build_delta(bb, extra={"something.else": torch.zeros(1)}), 422, "something.else"),
        ("labels vs head", build_delta(bb, metadata={"labels": '["a", "b", "c"]'}), 422, "head.classifier.weight"),
        ("missing head", build_delta(bb, drop=["head.classifier.weight"]), 422, "head.classifier.weight"),
        ("bad metadata", build_delta(bb, metadata={"task_type": "translation"}), 422, "task_type"),
        ("empty body", b"", 422, "empty"),
    ]


def test_bad_uploads_answer_4xx_and_store_nothing(tiny_backbone, tmp_path):
    with served(tiny_backbone, tmp_path) as client:
        good = build_delta(tiny_backbone)
        assert client.put("/tasks/kept", content=good, headers=ADMIN).status_code == 201
        before = store_files(tmp_path), (tmp_path / "manifest.json").read_bytes()
        for case, data, status, word in bad_deltas(tiny_backbone):
            for name in ("kept", "fresh"):  # a replace and a new task alike
                response = client.put(f"/tasks/{name}", content=data, headers=ADMIN)
                assert response.status_code == status, (case, response.text)
                detail = response.json()["detail"]
                assert isinstance(detail, str) and word in detail, (case, detail)
        assert (store_files(tmp_path), (tmp_path / "manifest.json").read_bytes()) == before
        assert [t["name"] for t in client.get("/tasks").json()["tasks"]] == ["kept"]
        assert client.get("/tasks/kept").json()["version"] == 1
        assert client.post("/tasks/kept/predict", json={"inputs": "still serving"}).status_code == 200


def test_oversized_upload_is_413(tiny_backbone, tmp_path):
    data = build_delta(tiny_backbone)
    with served(tiny_backbone, tmp_path, max_upload_bytes=len(data) - 1) as client:
        raw = client.put("/tasks/big", content=data, headers=ADMIN)
        assert raw.status_code == 413 and "limit" in raw.json()["detail"]

        def chunks():  # no Content-Length: the limit must hold while streaming too
            yield data[:100]
            yield data[100:]

        streamed = client.put("/tasks/big", content=chunks(), headers=ADMIN)
        assert streamed.status_code == 413
        multipart = client.put("/tasks/big", files={"file": ("d", data)}, headers=ADMIN)
        assert multipart.status_code == 413
        assert client.get("/tasks").json()["tasks"] == []


@pytest.mark.parametrize("name", ["bad name", "-dash", "x" * 65, "a!b", "ünï"])
def test_bad_task_names_are_422(tiny_backbone, tmp_path, name):
    with served(tiny_backbone, tmp_path) as client:
        for response in (client.put(f"/tasks/{name}", content=build_delta(tiny_backbone), headers=ADMIN),
                         client.get(f"/tasks/{name}"),
                         client.post(f"/tasks/{name}/predict", json={"inputs": "x"}),
                         client.delete(f"/tasks/{name}", headers=ADMIN)):
            assert response.status_code == 422 and "must match" in response.json()["detail"]
        assert client.get("/tasks").json()["tasks"] == []


def test_admin_token(tiny_backbone, tmp_path):
    data = build_delta(tiny_backbone)
    with served(tiny_backbone, tmp_path) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"},
                        {"Authorization": "s3cret"}):
            put = client.put("/tasks/t", content=data, headers=headers)
            assert put.status_code == 401 and "Bearer" in put.json()["detail"]
            assert put.headers["www-authenticate"] == "Bearer"
        assert client.get("/tasks").json()["tasks"] == []
        assert client.put("/tasks/t", content=data, headers=ADMIN).status_code == 201
        assert client.delete("/tasks/t", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert client.get("/tasks/t").status_code == 200  # reading and predicting need no token
        assert client.post("/tasks/t/predict", json={"inputs": "x"}).status_code == 200
        assert client.delete("/tasks/t", headers=ADMIN).status_code == 204
    with served(tiny_backbone, tmp_path / "open", admin_token=None) as client:
        assert client.put("/tasks/t", content=data).status_code == 201


def test_bad_predict_requests(tiny_backbone, tmp_path):
    with served(tiny_backbone, tmp_path, max_inputs=4) as client:
        client.put("/tasks/t", content=build_delta(tiny_backbone), headers=ADMIN)
        cases = [
            ({"content": b'{"inputs": "x"', "headers": {"content-type": "application/json"}}, 422, "JSON"),
            ({"content": b"inputs=x", "headers": {"content-type": "text/plain"}}, 422, "JSON object"),
            ({"json": {}}, 422, "inputs is required"),
            ({"json": {"inputs": []}}, 422, "empty"),
            ({"json": {"inputs": ""}}, 422, "empty"),
            ({"json": {"inputs": ["fine", "  "]}}, 422, "inputs[1]"),
            ({"json": {"inputs": 3}}, 422, "text"),
            ({"json": {"inputs": ["a", ["b", "c"]]}}, 422, "inputs[1]"),
            ({"json": {"inputs": [["a", "b"], ["c"]]}}, 422, "pair"),
            ({"json": {"inputs": [["a", "b", "c"]]}}, 422, "pair"),
            ({"json": {"inputs": ["a"] * 5}}, 413, "limit is 4"),
        ]
        for kwargs, status, word in cases:
            response = client.post("/tasks/t/predict", **kwargs)
            assert response.status_code == status, (kwargs, response.text)
            assert word in response.json()["detail"], (kwargs, response.json())
        missing = client.post("/tasks/nope/predict", json={"inputs": "x"})
        assert missing.status_code == 404 and "nope" in missing.json()["detail"]
        assert client.get("/tasks/nope").status_code == 404
        assert client.get("/no/such/route").json() == {"detail": "Not Found"}
        assert client.post("/tasks/t/predict", json={"inputs": ["a"] * 4}).status_code == 200


def test_oversized_predict_body_is_413(tiny_backbone, tmp_path):
    with served(tiny_backbone, tmp_path, max_request_bytes=1000) as client:
        client.put("/tasks/t", content=build_delta(tiny_backbone), headers=ADMIN)
        big = {"inputs": "word " * 300}
        declared = client.post("/tasks/t/predict", json=big)
        assert declared.status_code == 413 and "limit of 1000 bytes" in declared.json()["detail"]

        def chunks(body: bytes):  # no Content-Length: counted while streaming
            yield body[:10]
            yield body[10:]

        streamed = client.post("/tasks/t/predict", content=chunks(b'{"inputs": "' + b"word " * 300 + b'"}'),
                               headers={"content-type": "application/json"})
        assert streamed.status_code == 413
        small = client.post("/tasks/t/predict", content=chunks(b'{"inputs": "a few words"}'),
                            headers={"content-type": "application/json"})
        assert small.status_code == 200, small.text
        assert client.put("/tasks/u", content=build_delta(tiny_backbone), headers=ADMIN).status_code == 201


def test_a_corrupted_file_fails_only_its_task(tiny_backbone, tmp_path):
    with served(tiny_backbone, tmp_path) as client:
        client.put("/tasks/good", content=build_delta(tiny_backbone), headers=ADMIN)
        client.put("/tasks/bad", content=build_delta(tiny_backbone, seed=1), headers=ADMIN)
        path = tmp_path / "deltas" / "bad" / "1.safetensors"
        path.write_bytes(path.read_bytes()[:-4] + b"\x00\x00\x00\x00")
        bad = client.post("/tasks/bad/predict", json={"inputs": "x"})
        assert bad.status_code == 500 and "sha256" in bad.json()["detail"]
        assert client.post("/tasks/good/predict", json={"inputs": "x"}).status_code == 200
