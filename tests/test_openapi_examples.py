"""The OpenAPI schema has examples for every route, and the examples have the shapes the server answers."""

from __future__ import annotations

from typing import Any

from delta_builders import NER_LABELS, build_delta
from http_helpers import ADMIN, served

from server.api import examples


def media_has_example(media: dict[str, Any]) -> bool:
    return "example" in media or "examples" in media or "example" in media.get("schema", {})


def test_every_route_has_examples(tiny_backbone, tmp_path):
    with served(tiny_backbone, tmp_path) as client:
        schema = client.get("/openapi.json").json()
    missing = []
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            where = f"{method.upper()} {path}"
            for media_type, media in operation.get("requestBody", {}).get("content", {}).items():
                if "json" in media_type and not media_has_example(media):
                    missing.append(f"{where}: request body {media_type}")
            responses = operation.get("responses", {})
            if not any(status.startswith("2") for status in responses):
                missing.append(f"{where}: no success response")
            for status, response in responses.items():
                for media_type, media in response.get("content", {}).items():
                    if not media_has_example(media):
                        missing.append(f"{where}: response {status} {media_type}")
    assert not missing, "no example for:\n" + "\n".join(missing)
    put = schema["paths"]["/tasks/{name}"]["put"]["responses"]
    assert {"200", "201"} <= put.keys()  # replaced and created
    assert "text/plain" in schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]


MAPS = {"scores", "bytes_by_part", "linear_modules", "layer_norms"}


def fits(example: Any, answer: Any, where: str = "") -> None:
    """Every field of the example is in the real answer, with the same kind of value, recursively.

    (The answer may have more fields: a route that gains one keeps its example valid.)
    """
    if isinstance(example, dict):
        assert isinstance(answer, dict), where
        for key, value in example.items():
            assert key in answer, f"{where}.{key} is not in the server's answer"
            if key in MAPS:  # keys are data (labels, parts, modules), not fields
                assert isinstance(answer[key], dict), f"{where}.{key}"
                continue
            fits(value, answer[key], f"{where}.{key}")
    elif isinstance(example, list):
        assert isinstance(answer, list), where
        if example and answer:
            fits(example[0], answer[0], f"{where}[0]")
    elif example is not None and answer is not None:
        numbers = (int, float)
        assert isinstance(example, numbers) == isinstance(answer, numbers), where


def test_examples_have_the_servers_shapes(tiny_backbone, tmp_path):
    with served(tiny_backbone, tmp_path) as client:
        created = client.put("/tasks/sst2-mask", content=build_delta(tiny_backbone, parts=("keep",)), headers=ADMIN)
        replaced = client.put("/tasks/sst2-mask", content=build_delta(tiny_backbone, parts=("keep",)), headers=ADMIN)
        client.put("/tasks/conll-ner", content=build_delta(tiny_backbone, task_type="token-classification",
                                                           labels=NER_LABELS), headers=ADMIN)
        real = {
            ("post", "/tasks/{name}/predict"): client.post("/tasks/sst2-mask/predict", json=examples.EXAMPLES[
                ("post", "/tasks/{name}/predict")]["request"]).json(),
            ("get", "/tasks"): client.get("/tasks").json(),
            ("get", "/tasks/{name}"): client.get("/tasks/sst2-mask").json(),
            ("get", "/backbone"): client.get("/backbone").json(),
            ("get", "/memory"): client.get("/memory").json(),
            ("get", "/health"): client.get("/health").json(),
        }
        ner = client.post("/tasks/conll-ner/predict", json={"inputs": "Angela Merkel visited Washington."}).json()
        missing_task = client.get("/tasks/sst2").json()
    for route, answer in real.items():
        example = examples.EXAMPLES[route]["200"]
        fits(example, answer, str(route))
        if route[1] not in ("/backbone", "/tasks"):
            assert example.keys() == answer.keys(), route  # and nothing of the answer is left out
    fits(examples.EXAMPLES[("put", "/tasks/{name}")]["201"], created.json(), "PUT 201")
    fits(examples.EXAMPLES[("put", "/tasks/{name}")]["200"], replaced.json(), "PUT 200")
    assert created.status_code == 201 and replaced.status_code == 200
    fits(examples.MORE[("post", "/tasks/{name}/predict", "200")]["token classification"]["value"], ner, "NER")
    assert examples.ERRORS["404"] == missing_task["detail"]
