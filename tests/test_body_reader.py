"""Issue 24 item 8: one JSON body reader for every route, and token-classification windows counted first.

`/models` read its body with FastAPI's own `json.loads`, which guesses UTF-16 and skips a BOM that
the other routes refuse; a 5,000-digit integer was a 400 "error parsing the body"; `stride: false`
was read as 0. A token-classification request built all its windows (4,220: 2.2 s, +113 MB)
before the window limit answered 413.
"""

from __future__ import annotations

import json

import pytest
from delta_builders import NER_LABELS, build_delta
from http_helpers import ADMIN, served

from server.windows import count_windows, encode_windows

ROUTES = {  # route -> (a valid body, where a number can go, the status a malformed body answers)
    "/tasks/ner/predict": ({"inputs": "Paris"}, 422),
    "/models/ner": ({"inputs": "Paris"}, 400),  # the Inference API's status for a malformed request
    "/v2/models/ner/infer": ({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["Paris"]}]},
                             400),
}


@pytest.fixture
def client(tiny_backbone, tmp_path):
    with served(tiny_backbone, tmp_path, max_windows=8) as client:
        ner = build_delta(tiny_backbone, task_type="token-classification", labels=NER_LABELS)
        assert client.put("/tasks/ner", content=ner, headers=ADMIN).status_code == 201
        yield client


def message(response) -> str:
    body = response.json()
    return body.get("detail") or body.get("error")


def post(client, route: str, content: bytes, **headers: str):
    return client.post(route, content=content, headers={"Content-Type": "application/json", **headers})


@pytest.mark.parametrize("route", ROUTES)
def test_every_route_reads_its_body_alike(client, route):
    body, status = ROUTES[route]
    text = json.dumps(body)
    assert post(client, route, text.encode()).status_code == 200
    cases = [
        ("UTF-16", text.encode("utf-16"), {}, "not UTF-8"),
        ("UTF-16-LE", text.encode("utf-16-le"), {}, "JSON"),  # ASCII as UTF-16: NULs, valid UTF-8
        ("BOM", b"\xef\xbb\xbf" + text.encode(), {}, "BOM"),
        ("gzip", text.encode(), {"Content-Encoding": "gzip"}, "Content-Encoding"),
        ("5,000 digits", (text[:-1] + ', "n": ' + "9" * 5000 + "}").encode(), {}, "4300 digits"),
        ("deep", (text[:-1] + ', "n": ' + "[" * 100_000 + "]" * 100_000 + "}").encode(), {}, "nested too deeply"),
    ]
    for case, content, headers, word in cases:
        response = post(client, route, content, **headers)
        assert response.status_code == status, (case, response.text)
        assert word in message(response), (case, message(response))


def test_hugging_face_parameters_are_strict(client):
    for parameters in ({"stride": False}, {"stride": "3"}, {"top_k": True}, {"stride": 2.0}):
        response = client.post("/models/ner", json={"inputs": "Paris is nice", "parameters": parameters})
        assert response.status_code == 400, (parameters, response.text)
        assert next(iter(parameters)) in message(response)
    assert client.post("/models/ner", json={"inputs": "Paris", "parameters": {"stride": 3}}).status_code == 200


def test_windows_are_counted_before_they_are_built(client, tiny_backbone, monkeypatch):
    built = []
    original = tiny_backbone.tokenizer.__class__.__call__

    def spy(self, *args, **kwargs):
        built.append(kwargs.get("return_overflowing_tokens", False))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(tiny_backbone.tokenizer.__class__, "__call__", spy)
    response = client.post("/tasks/ner/predict", json={"inputs": ["word " * 3000, "Paris"]})
    assert response.status_code == 413 and "windows" in response.json()["detail"]
    assert True not in built, "the windows were built before the limit refused them"


@pytest.mark.parametrize("max_length", [8, 16, 128])
@pytest.mark.parametrize("stride", [None, 0, 1, 3])
def test_the_count_is_the_number_of_windows_built(tiny_backbone, max_length, stride):
    texts = ["", "one", "Paris " * 5, "word " * 7, "a longer text, with punctuation: " * 20, "x" * 400,
             "naïve café über " * 30]
    windows = encode_windows(tiny_backbone, texts, max_length, stride)
    assert count_windows(tiny_backbone, texts, max_length, stride) == [len(w) for w in windows]
